"""LLMEngine.adopt: a held (prefilled) request decodes on its own blocks, no copy, same tokens."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine.engine import EngineConfig, LLMEngine
from engine.sampling import SamplingParams


@pytest.fixture(scope="module")
def tiny(model_dir: Path) -> Path:
    return model_dir


def _engine(path: Path) -> LLMEngine:
    return LLMEngine(EngineConfig(model=str(path), num_blocks=64, block_size=8, max_num_batched_tokens=32))


def _run(engine: LLMEngine) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    while engine.has_work():
        for o in engine.step():
            out.setdefault(o.request_id, []).extend(o.token_ids)
    return out


PROMPT = torch.arange(3, 40).tolist()


def test_adopt_decodes_on_the_held_blocks_like_a_plain_request(tiny: Path) -> None:
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    plain = _engine(tiny)
    plain.add_request("a", PROMPT, params)
    expected = _run(plain)["a"]

    engine = _engine(tiny)
    engine.add_request("a", PROMPT, params, hold_kv=True)
    first = _run(engine)["a"]
    held = engine.kv_block_ids("a")
    free_before = engine.num_free_blocks
    engine.adopt("a", params)
    assert engine.kv_block_ids("a")[: len(held)] == held  # the same blocks: nothing copied
    assert engine.num_free_blocks == free_before
    rest = _run(engine)["a"]
    assert first + rest == expected
    assert engine.num_free_blocks == engine.num_total_blocks and not engine.requests


def test_adopt_of_an_unknown_or_running_request_fails_and_abort_frees(tiny: Path) -> None:
    engine = _engine(tiny)
    params = SamplingParams(max_tokens=4, ignore_eos=True)
    with pytest.raises(KeyError):
        engine.adopt("nope", params)
    engine.add_request("r", PROMPT, params)
    with pytest.raises(ValueError):
        engine.adopt("r", params)  # waiting, not held
    engine.abort("r")
    engine.add_request("h", PROMPT, params, hold_kv=True)
    _run(engine)
    engine.adopt("h", params)
    engine.step()
    engine.abort("h")  # mid-decode
    assert engine.num_free_blocks == engine.num_total_blocks


def test_adopt_with_max_tokens_one_finishes_at_once(tiny: Path) -> None:
    engine = _engine(tiny)
    engine.add_request("x", PROMPT, SamplingParams(max_tokens=1), hold_kv=True)
    _run(engine)
    engine.adopt("x", SamplingParams(max_tokens=1))
    outs = engine.step()
    assert [(o.request_id, o.finish_reason) for o in outs] == [("x", "length")]
    assert engine.num_free_blocks == engine.num_total_blocks
