"""pdserve's model over the paged cache == transformers' logits (fp32, 1e-4), for every kind."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine.model import LlamaModel, build_model
from tests.checkpoints import KINDS, PagedRunner, load_hf_model, write_hf_checkpoint

torch.set_num_threads(1)
ATOL = 1e-4
PROMPT_LEN, DECODE_STEPS = 20, 5


@pytest.fixture(scope="module", params=KINDS)
def pair(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple:
    path = write_hf_checkpoint(tmp_path_factory.mktemp(request.param), request.param)
    return build_model(path, torch.float32), load_hf_model(path), path


def _tokens(n: int, seed: int) -> list[int]:
    return torch.randint(1, 1000, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@torch.no_grad()
def _hf_logits(hf: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    return hf(torch.tensor([ids])).logits[0].float()  # [T, vocab]


def test_whole_prompt_prefill(pair: tuple[LlamaModel, torch.nn.Module, Path]) -> None:
    model, hf, _ = pair
    ids = _tokens(PROMPT_LEN, 1)
    (logits,) = PagedRunner(model).step([("a", ids)])
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits, _hf_logits(hf, ids), atol=ATOL, rtol=0)


def test_chunked_prefill_then_decode(pair: tuple[LlamaModel, torch.nn.Module, Path]) -> None:
    model, hf, _ = pair
    ids = _tokens(PROMPT_LEN + DECODE_STEPS, 2)
    runner = PagedRunner(model, seed=5)
    out = [
        runner.step([("a", ids[i : min(i + 3, PROMPT_LEN)])])[0] for i in range(0, PROMPT_LEN, 3)
    ]
    out += [runner.step([("a", [t])])[0] for t in ids[PROMPT_LEN:]]
    torch.testing.assert_close(torch.cat(out), _hf_logits(hf, ids), atol=ATOL, rtol=0)


def test_mixed_batch(pair: tuple[LlamaModel, torch.nn.Module, Path]) -> None:
    """Decode tokens of different lengths and prefill chunks share every step."""
    model, hf, _ = pair
    seqs = {"a": _tokens(17, 3), "b": _tokens(9, 4), "c": _tokens(12, 5), "d": _tokens(2, 6)}
    plans = {"a": [11, 1, 1, 1, 1, 1, 1], "b": [1, 4, 1, 1, 1, 1], "c": [5, 5, 1, 1], "d": [2]}
    runner = PagedRunner(model, num_blocks=96, seed=7)
    got: dict[str, list[torch.Tensor]] = {s: [] for s in seqs}
    done = dict.fromkeys(seqs, 0)
    for step in range(max(len(p) for p in plans.values())):
        batch = []
        for s, plan in plans.items():
            if step < len(plan):
                batch.append((s, seqs[s][done[s] : done[s] + plan[step]]))
                done[s] += plan[step]
        for (s, _), logits in zip(batch, runner.step(batch), strict=True):
            got[s].append(logits)
    for s, ids in seqs.items():
        torch.testing.assert_close(
            torch.cat(got[s]), _hf_logits(hf, ids[: done[s]]), atol=ATOL, rtol=0
        )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_close(
    pair: tuple[LlamaModel, torch.nn.Module, Path], dtype: torch.dtype
) -> None:
    _, hf, path = pair
    ids = _tokens(12, 8)
    runner = PagedRunner(build_model(path, dtype))
    assert runner.kv.dtype == dtype
    logits = torch.cat(
        [runner.step([("a", ids[:8])])[0]] + [runner.step([("a", [t])])[0] for t in ids[8:]]
    )
    ref = _hf_logits(hf, ids)
    assert (logits - ref).abs().max() < 0.1 * ref.abs().max()


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_make_model_checkpoints_run(arch: str, tmp_path: Path) -> None:
    """pdserve's own writer produces checkpoints transformers and pdserve agree on."""
    from engine.make_model import main

    assert main([str(tmp_path), "--arch", arch, "--seed", "3"]) == 0
    ids = _tokens(10, 9)
    (logits,) = PagedRunner(build_model(tmp_path, torch.float32)).step([("a", ids)])
    torch.testing.assert_close(logits, _hf_logits(load_hf_model(tmp_path), ids), atol=ATOL, rtol=0)
