from __future__ import annotations

import pytest
import torch

from engine.sampling import SamplingParams, sample


def _gens(n: int, seed: int = 0) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(seed + i) for i in range(n)]


def test_params_validation_names_field() -> None:
    for kwargs, field in [
        ({"max_tokens": 0}, "max_tokens"),
        ({"temperature": -1.0}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_k": 0}, "top_k"),
        ({"seed": -3}, "seed"),
        ({"stop": "x"}, "stop"),
        ({"stop": ("",)}, "stop"),
        ({"stop_token_ids": (1.5,)}, "stop_token_ids"),
    ]:
        with pytest.raises(ValueError, match=field):
            SamplingParams(**kwargs)  # type: ignore[arg-type]
    p = SamplingParams(stop=["a"], stop_token_ids=[3])  # type: ignore[arg-type]
    assert p.stop == ("a",) and p.stop_token_ids == (3,) and p.greedy


def test_greedy_and_logprobs() -> None:
    logits = torch.randn(3, 50)
    toks, lps = sample(logits, [SamplingParams(logprobs=True)] * 3, _gens(3))
    assert torch.equal(toks, logits.argmax(-1))
    ref = torch.log_softmax(logits, -1).gather(1, toks[:, None]).squeeze(1)
    torch.testing.assert_close(lps, ref)


def test_seeded_sampling_is_batch_independent() -> None:
    torch.manual_seed(0)
    logits = torch.randn(4, 100)
    p = SamplingParams(temperature=1.0, seed=7)
    alone = [sample(logits[2:3], [p], [torch.Generator().manual_seed(7)])[0].item() for _ in range(1)]
    params = [SamplingParams(temperature=0.8), SamplingParams(), p, SamplingParams(temperature=2.0)]
    gens = _gens(4, 100)
    gens[2] = torch.Generator().manual_seed(7)
    batched = sample(logits, params, gens)[0]
    assert batched[2].item() == alone[0]


def test_top_k_and_top_p_restrict_support() -> None:
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0, -1.0]]).repeat(1, 1)
    probs = torch.softmax(logits, -1)[0]
    g = torch.Generator().manual_seed(0)
    seen_k = {int(sample(logits, [SamplingParams(temperature=5.0, top_k=2)], [g])[0]) for _ in range(300)}
    assert seen_k == {0, 1}
    # top_p just above p0 keeps tokens 0 and 1 only
    top_p = float(probs[0] + 0.01)
    seen_p = {int(sample(logits, [SamplingParams(temperature=1.0, top_p=top_p)], [g])[0]) for _ in range(300)}
    assert seen_p == {0, 1}
    seen_all = {int(sample(logits, [SamplingParams(temperature=50.0)], [g])[0]) for _ in range(400)}
    assert seen_all == set(range(6))


def test_logprobs_are_of_raw_distribution_when_sampling() -> None:
    logits = torch.randn(2, 30)
    toks, lps = sample(logits, [SamplingParams(temperature=0.5, top_k=3, logprobs=True)] * 2, _gens(2))
    ref = torch.log_softmax(logits, -1).gather(1, toks[:, None]).squeeze(1)
    torch.testing.assert_close(lps, ref)
