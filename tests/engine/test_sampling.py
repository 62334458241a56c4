from __future__ import annotations

import random
from collections.abc import Sequence

import pytest
import torch

from engine.sampling import SamplingParams, sample
from engine.stop import MAX_PENDING, StopChecker, StopMatcher, truncate_at_stop


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


class PieceCodec:
    """Test decoder: token i is PIECES[i] (bytes; some split a UTF-8 character); counts ids decoded."""

    PIECES = [b"ST", b"OP", b"P\xe2", b"\x82\xac", b"a", b" E", b"ND", b"\xc3", b"\xa9", b"x"]

    def __init__(self) -> None:
        self.decoded_ids = 0

    def decode(self, ids: Sequence[int]) -> str:
        self.decoded_ids += len(ids)
        return b"".join(self.PIECES[i] for i in ids).decode("utf-8", errors="replace")


def _first_stop_step(ids: list[int], stops: tuple[str, ...]) -> int | None:
    """The step whose token first puts a stop string in the whole decoded output (the old check)."""
    codec = PieceCodec()
    return next((k for k in range(1, len(ids) + 1) if any(s in codec.decode(ids[:k]) for s in stops)), None)


def _checker_stop_step(ids: list[int], stops: tuple[str, ...]) -> int | None:
    checker = StopChecker(stops, PieceCodec())
    return next((k for k in range(1, len(ids) + 1) if checker.update(ids[:k])), None)


def test_stop_string_split_across_steps_is_found_on_the_step_completing_it() -> None:
    ids = [4, 5, 6, 4]  # "a", " E", "ND", "a": "END" spans the 2nd and 3rd tokens
    assert _checker_stop_step(ids, ("END",)) == 3
    assert _checker_stop_step([0, 1, 4], ("STOP",)) == 2
    assert _checker_stop_step([0, 2, 3], ("STP€",)) == 3  # '€' is split across two tokens
    assert _checker_stop_step([0, 2], ("STP",)) == 2  # found before the held-back character completes
    assert _checker_stop_step([4, 9, 4], ("END",)) is None


def test_incremental_stop_check_agrees_with_decoding_the_whole_output() -> None:
    rng = random.Random(0)
    for _ in range(300):
        ids = [rng.randrange(len(PieceCodec.PIECES)) for _ in range(rng.randrange(1, 24))]
        stops = tuple(rng.choice(["END", "STOP", "P€", "é", "aa", "OPP", "€a E"]) for _ in range(2))
        assert _checker_stop_step(ids, stops) == _first_stop_step(ids, stops), (ids, stops)


def test_stop_check_work_per_step_is_bounded() -> None:
    codec = PieceCodec()
    checker = StopChecker(("never here",), codec)
    output: list[int] = []
    per_step = []
    for i in range(3000):
        output.append([4, 5, 7, 8, 9, 2, 3][i % 7])
        before = codec.decoded_ids
        assert not checker.update(output)
        per_step.append(codec.decoded_ids - before)
    # a whole decode per step would read 1 + 2 + ... + 3000 ids; the window reads a handful each step
    assert max(per_step) <= 4 * MAX_PENDING and sum(per_step) <= 8 * len(output)


def test_stop_matcher_keeps_only_a_tail_shorter_than_the_longest_stop() -> None:
    m = StopMatcher(["abcd", "xy"])
    emitted = "".join(m.feed(piece)[0] for piece in ["zzab", "c", "zzzzzzx", "abc"])
    assert emitted == "zzabczzzzzzx"  # all but "abc", which may start "abcd"
    assert m.feed("d") == ("", True)


def test_truncate_at_stop_cuts_before_the_first_stop_string() -> None:
    assert truncate_at_stop("ab END cd xy", ("xy", "END")) == "ab "
    assert truncate_at_stop("no stop here", ("END",)) == "no stop here"
    assert truncate_at_stop("ends with EN", ("END",)) == "ends with EN"
