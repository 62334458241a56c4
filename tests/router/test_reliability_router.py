"""The router's failure handling over real gRPC with scripted fake workers (fast, no Ray).

The fakes' model is "next token = last + 1", so a migrated request's output is known exactly: any
duplicated or missing token shows up as a wrong id.
"""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
from pdserve.v1 import router_pb2

from router.client import build_request
from tests.fake_workers import Cluster, FakeDecode, FakePrefill, make_config, start_cluster
from tests.router.test_router import collect, run, status_of, wait_for

PROMPT = "abc"  # ids 97 98 99: the completion is 100, 101, ...


def _tokens(msgs: list[router_pb2.GenerateResponse]) -> list[int]:
    return [t for m in msgs for t in m.token_ids]


async def _dying_and_spare(**config: object) -> tuple[Cluster, FakePrefill, FakeDecode, FakeDecode]:
    prefill, dying, spare = FakePrefill(), FakeDecode(batch=2), FakeDecode(batch=2)
    c = await start_cluster({"p0": prefill}, {}, make_config(**config), wait=False)
    await c.add("d-dying", dying, kv_blocks_free=900)  # picked first
    await c.add("d-spare", spare, kv_blocks_free=100)
    await c.wait_serving()
    await wait_for(lambda: len(c.router.registry.replicas) == 3)
    return c, prefill, dying, spare


@run
async def test_decode_dying_mid_stream_migrates_without_gap_or_duplicate() -> None:
    c, prefill, dying, spare = await _dying_and_spare()
    try:
        dying.fail = (grpc.StatusCode.UNAVAILABLE, "connection reset")  # after its first message
        msgs = await collect(c, build_request(PROMPT, max_tokens=9, request_id="mig"))
        assert _tokens(msgs) == list(range(100, 109))
        assert msgs[-1].finish_reason == router_pb2.LENGTH and msgs[-1].usage.completion_tokens == 9
        # prefill saw the prompt, then prompt + the 3 tokens already sent (first + one message of 2)
        assert prefill.record.requests == ["mig", "mig/m1"]
        assert dying.record.requests == ["mig"] and spare.record.finished == ["mig/m1"]
        await wait_for(lambda: not prefill.leased)  # both leases released
        await wait_for(lambda: c.router.deps.admission.inflight == 0)
    finally:
        await c.close()


@run
async def test_migration_off_or_no_replica_left_is_unavailable_at_once() -> None:
    c, prefill, dying, spare = await _dying_and_spare(migration=False)
    try:
        dying.fail = (grpc.StatusCode.UNAVAILABLE, "connection reset")
        start = time.monotonic()
        code, details = await status_of(c, build_request(PROMPT, max_tokens=9, request_id="off"))
        assert code == grpc.StatusCode.UNAVAILABLE and "d-dying" in details
        assert time.monotonic() - start < 2 and spare.record.requests == []
    finally:
        await c.close()
    c, prefill, dying, spare = await _dying_and_spare()
    try:
        dying.fail = spare.fail = (grpc.StatusCode.UNAVAILABLE, "connection reset")
        code, details = await status_of(c, build_request(PROMPT, max_tokens=20, request_id="none"))
        assert code == grpc.StatusCode.UNAVAILABLE
        await wait_for(lambda: not prefill.leased and c.router.deps.admission.inflight == 0)
    finally:
        await c.close()


@run
async def test_silent_decode_replica_is_abandoned_and_the_request_migrates() -> None:
    """A peer that dies without closing its connection: the call is dropped once the registry
    forgets the replica (3 heartbeats), not at the client's deadline."""
    c, prefill, dying, spare = await _dying_and_spare()
    try:
        dying.token_delay = 3600.0  # hangs before its first message ...
        task = asyncio.ensure_future(collect(c, build_request(PROMPT, max_tokens=6, request_id="quiet")))
        await wait_for(lambda: dying.record.requests == ["quiet"])
        await c.worker("d-dying").stop_heartbeats()  # ... and goes silent
        start = time.monotonic()
        msgs = await asyncio.wait_for(task, 5)
        assert time.monotonic() - start < 2
        assert _tokens(msgs) == list(range(100, 106))
        await wait_for(lambda: dying.record.cancelled == ["quiet"])  # the abandoned call was cancelled
    finally:
        await c.close()


@run
async def test_prefill_replica_failing_unavailable_is_retried_on_another() -> None:
    bad, good = FakePrefill(), FakePrefill()
    c = await start_cluster({"p-bad": bad, "p-good": good}, {"d0": FakeDecode()})
    try:
        bad.fail = (grpc.StatusCode.UNAVAILABLE, "engine died")
        for i in range(4):  # whichever is picked first, every request succeeds
            msgs = await collect(c, build_request(PROMPT, max_tokens=3, request_id=f"p{i}"))
            assert _tokens(msgs) == [100, 101, 102]
        assert len(good.record.requests) == 4
    finally:
        await c.close()


@run
async def test_overload_excess_is_resource_exhausted_at_once_and_admitted_all_succeed() -> None:
    c = await start_cluster({"p0": FakePrefill(delay=0.3)}, {"d0": FakeDecode()}, make_config(max_inflight=4))
    try:
        calls = [asyncio.ensure_future(collect(c, build_request(PROMPT, max_tokens=3, request_id=f"o{i}")))
                 for i in range(12)]
        results = await asyncio.gather(*calls, return_exceptions=True)
        ok = [r for r in results if isinstance(r, list)]
        refused = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
        assert len(ok) == 4 and len(refused) == 8
        assert all(_tokens(r) == [100, 101, 102] for r in ok)
        assert all(e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED for e in refused)
    finally:
        await c.close()


def test_deadline_reaches_the_workers_as_an_absolute_time() -> None:
    """gRPC carries the client's deadline to each worker call; a worker sees what is left of it."""

    async def body() -> None:
        prefill = FakePrefill(delay=5.0)
        c = await start_cluster({"p0": prefill}, {"d0": FakeDecode()})
        try:
            start = time.monotonic()
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await collect(c, build_request(PROMPT, max_tokens=3), timeout=0.5)
            assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            await wait_for(lambda: len(prefill.record.cancelled) == 1, 2.0)  # the worker's call ended too
            assert time.monotonic() - start < 1.5
        finally:
            await c.close()

    asyncio.run(asyncio.wait_for(body(), 30))


def test_migration_is_a_yaml_key_that_reaches_the_router() -> None:
    from deploy.cluster import router_config
    from deploy.config import ConfigError, parse_config

    model = {"max_model_len": 64}
    assert router_config(parse_config({"model": model}, "t"), 1000, ()).migration is True
    off = parse_config({"model": model, "router": {"migration": False}}, "t")
    assert router_config(off, 1000, ()).migration is False
    with pytest.raises(ConfigError, match="router.migration"):
        parse_config({"router": {"migration": "no"}}, "t")
