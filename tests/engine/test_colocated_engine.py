"""LLMEngine.adopt: a held (prefilled) request decodes on its own blocks, no copy, same tokens; the
same hand-offs through AsyncEngine's typed methods (adopt, reserve + set_first_token + resume)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
import torch

from engine.async_engine import AsyncEngine, RequestStream
from engine.engine import EngineConfig, LLMEngine
from engine.faults import slow_steps
from engine.finish import FinishReason
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
    assert [(o.request_id, o.finish_reason) for o in outs] == [("x", FinishReason.LENGTH)]
    assert engine.num_free_blocks == engine.num_total_blocks


async def _tokens(stream: RequestStream) -> tuple[list[int], FinishReason | None]:
    tokens: list[int] = []
    while True:
        out = await stream.next(timeout=30)
        tokens.extend(out.token_ids)
        if out.finish_reason is not None:
            return tokens, out.finish_reason


def test_async_engine_adopts_a_held_prompt_and_reports_it(tiny: Path) -> None:
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    plain = _engine(tiny)
    plain.add_request("a", PROMPT, params)
    expected = _run(plain)["a"]

    async def body() -> None:
        engine = AsyncEngine(_engine(tiny), asyncio.get_running_loop())
        first, reason = await _tokens(engine.submit("a", PROMPT, params, hold_kv=True))
        assert reason == FinishReason.PREFILLED and reason == "prefilled"
        [row] = await engine.request_rows()
        assert (row.request_id, row.status, row.blocks) == ("a", "held", -(-len(PROMPT) // 8))
        assert (engine.num_running, engine.num_waiting) == (0, 0)
        assert engine.num_total_blocks - engine.num_free_blocks == row.blocks
        assert len(engine.prefix_hashes(2)) == 2  # the prompt's full blocks are in the prefix cache
        stream = engine.open_stream("a")
        await engine.adopt("a", params)
        rest, reason = await _tokens(stream)
        assert first + rest == expected and reason == FinishReason.LENGTH
        assert await engine.request_rows() == [] and engine.num_free_blocks == 64
        await engine.shutdown()
        engine.close()

    asyncio.run(body())


def test_async_engine_reserve_then_resume_decodes_like_a_decode_replica(tiny: Path) -> None:
    """Reserve (waiting for room an abort frees), set the first token late, resume: the blocks keep
    the KV a plain prefill wrote, so the tokens are the plain run's."""
    params = SamplingParams(max_tokens=6, ignore_eos=True)

    async def body() -> None:
        llm = _engine(tiny)
        engine = AsyncEngine(llm, asyncio.get_running_loop())
        expected, _ = await _tokens(engine.submit("p", PROMPT, params, hold_kv=True))
        held = llm.kv_block_ids("p")  # the engine thread is idle (no work): safe to read from here
        hog = [1] * (engine.num_free_blocks * 8)
        assert await engine.reserve("hog", hog, 1, params, wait=0.0) is not None
        assert await engine.reserve("late", PROMPT, 0, params, wait=0.05) is None  # no room
        asyncio.get_running_loop().call_later(0.1, engine.abort, "hog")
        start = time.monotonic()
        blocks = await engine.reserve("d", PROMPT, 0, params, wait=5.0)  # room comes with the abort
        assert blocks is not None and time.monotonic() - start >= 0.09
        # as a pull would (the engine still idle): the prompt's KV into the reserved blocks
        llm.kv[torch.tensor(blocks)] = llm.kv[held[: len(blocks)]]  # kv: [blocks, layers, 2, H, bs, D]
        await engine.set_first_token("d", expected[0])
        stream = engine.open_stream("d")
        await engine.resume("d")
        rest, reason = await _tokens(stream)
        assert expected[:1] + rest == _plain(tiny, params) and reason == FinishReason.LENGTH
        engine.close()

    asyncio.run(body())


def _plain(path: Path, params: SamplingParams) -> list[int]:
    engine = _engine(path)
    engine.add_request("x", PROMPT, params)
    return _run(engine)["x"]


def test_slow_steps_delays_each_step_and_an_abort_in_the_delay_wins(tiny: Path) -> None:
    params = SamplingParams(max_tokens=3, ignore_eos=True)

    async def body() -> None:
        llm = _engine(tiny)
        engine = AsyncEngine(llm, asyncio.get_running_loop())
        slow_steps(engine, 0.2)
        start = time.monotonic()
        stream = engine.submit("s", PROMPT[:8], params)  # its first step would sample a token
        await asyncio.sleep(0.05)
        engine.abort("s")  # lands during the first step's delay: applied before that step
        tokens, reason = await _tokens(stream)
        assert (tokens, reason) == ([], FinishReason.ABORT) and time.monotonic() - start < 1.0
        slow_steps(engine, 0.0)
        assert engine.engine is llm
        tokens, reason = await _tokens(engine.submit("t", PROMPT, params))
        assert len(tokens) == 3 and reason == FinishReason.LENGTH
        engine.close()

    asyncio.run(body())
