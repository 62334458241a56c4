"""Aborts from every state, and worker failures, with the real replicas in this process (no Ray).

One prefill replica (TP 1) and two decode replicas, KV over UCX, the router in front. Each state is
held open with a fault-injection knob (slow engine steps, a delayed pull, a decode with no room, a
router that waits before decode), the client cancels, and every block on both sides must be free
within 1 s.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from pdserve.v1 import router_pb2, router_pb2_grpc, worker_pb2, worker_pb2_grpc

from decode_worker.config import DecodeWorkerConfig
from decode_worker.faults import delay_pulls
from decode_worker.replica import DecodeReplica
from engine.config import EngineConfig, load_config
from engine.faults import slow_steps
from engine.sampling import SamplingParams
from engine.scheduler import RequestStatus
from engine.tokenizer import Tokenizer
from prefill_worker.config import PrefillWorkerConfig
from prefill_worker.replica import PrefillReplica
from router.client import build_request
from router.config import RouterConfig
from router.registry import DECODE, PREFILL
from router.request_run import RequestRun
from router.server import RouterServer
from tests.fake_workers import beat_into

BLOCKS = 64
HEARTBEAT = 0.25
LONG_PROMPT = list(range(1, 61))  # 4 chunks of 16 tokens


def _prompt(seed: int) -> list[int]:
    """A 60-token prompt of its own (no prefix shared with another: the prefix cache stays out)."""
    return [(seed * 97 + 7 * i) % 900 + 1 for i in range(60)]


@dataclass
class Rig:
    router: RouterServer
    prefill: PrefillReplica
    decodes: dict[str, DecodeReplica]
    stub: router_pb2_grpc.RouterStub
    beating: dict[str, Any]

    def engines(self) -> list[Any]:
        replicas: list[PrefillReplica | DecodeReplica] = [self.prefill, *self.decodes.values()]
        return [r.engine.engine for r in replicas if r.engine is not None]

    def all_free(self) -> bool:
        assert self.prefill.service is not None
        decodes_idle = all(d.service is not None and not d.service.active for d in self.decodes.values())
        return (all(e.num_free_blocks == e.num_total_blocks and not e.requests for e in self.engines())
                and not self.prefill.service.leases and decodes_idle)

    async def wait_free(self, within: float = 1.0) -> float:
        start = time.monotonic()
        while not self.all_free():
            assert time.monotonic() - start < within, f"blocks not free within {within}s"
            await asyncio.sleep(0.01)
        return time.monotonic() - start


async def _with_rig(model_dir: Path, body: Callable[[Rig], Awaitable[None]]) -> None:
    model = load_config(str(model_dir))
    prefill = PrefillReplica(PrefillWorkerConfig(
        EngineConfig(str(model_dir), num_blocks=BLOCKS, max_num_batched_tokens=16), heartbeat_seconds=HEARTBEAT))
    decodes = {f"d{i}": DecodeReplica(DecodeWorkerConfig(EngineConfig(str(model_dir), num_blocks=BLOCKS),
                                                          heartbeat_seconds=HEARTBEAT,
                                                          admission_wait_seconds=3.0)) for i in range(2)}
    router = RouterServer(RouterConfig(vocab_size=model.vocab_size, context_len=256, eos_token_ids=(),
                                       port=0, heartbeat_seconds=HEARTBEAT), Tokenizer.from_model_dir(model_dir))
    await prefill.start()
    for d in decodes.values():
        await d.start()
    await router.start()
    beating: dict[str, Any] = {"p0": prefill, **decodes}
    beats = asyncio.get_running_loop().create_task(beat_into(router, beating, HEARTBEAT))
    channel = grpc.aio.insecure_channel(router.address)
    try:
        while len(router.registry.ready(PREFILL)) + len(router.registry.ready(DECODE)) < 3:
            await asyncio.sleep(0.02)
        await body(Rig(router, prefill, decodes, router_pb2_grpc.RouterStub(channel), beating))
    finally:
        beats.cancel()
        await channel.close()
        await router.stop(0)
        for d in decodes.values():
            await d.stop()
        await prefill.stop()


def _run(model_dir: Path, body: Callable[[Rig], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(_with_rig(model_dir, body), 180))


async def _start(rig: Rig, prompt: list[int], max_tokens: int = 40, rid: str = "") -> Any:
    call = rig.stub.Generate(build_request(prompt, max_tokens=max_tokens, ignore_eos=True, request_id=rid))
    return call


async def _until(cond: Callable[[], bool], within: float = 5.0) -> None:
    start = time.monotonic()
    while not cond():
        assert time.monotonic() - start < within, "state never reached"
        await asyncio.sleep(0.01)


def _status(replica: Any, rid: str) -> RequestStatus | None:
    req = replica.engine.engine.requests.get(rid)
    return None if req is None else req.status


async def _cancel(call: Any) -> None:
    call.cancel()
    with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
        await call.code()


async def _queued_and_prefilling(rig: Rig) -> None:
    assert rig.prefill.engine is not None
    slow_steps(rig.prefill.engine, 0.2)
    first = await _start(rig, _prompt(1), rid="a")
    inner = rig.prefill.engine.engine

    def partial(rid: str) -> bool:
        req = inner.requests.get(rid)
        return req is not None and req.status == RequestStatus.RUNNING and 0 < req.num_computed_tokens < 60

    await _until(lambda: partial("a"))
    second = await _start(rig, _prompt(2), rid="b")
    await _until(lambda: _status(rig.prefill, "b") == RequestStatus.WAITING)
    assert partial("a")  # "a" is prefilling (chunk by chunk), "b" is queued behind it
    await _cancel(first)
    await _cancel(second)
    slow_steps(rig.prefill.engine, 0.0)
    await rig.wait_free()


async def _leased(rig: Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    real = RequestRun.stream_decode

    async def late(*args: Any, **kwargs: Any) -> None:
        await asyncio.sleep(30)
        await real(*args, **kwargs)

    monkeypatch.setattr(RequestRun, "stream_decode", late)
    call = await _start(rig, _prompt(3), rid="leased")
    service = rig.prefill.service
    assert service is not None
    await _until(lambda: "leased" in service.leases)  # prefill done, KV leased, no decode yet
    await _cancel(call)
    monkeypatch.setattr(RequestRun, "stream_decode", real)
    await rig.wait_free()


async def _waiting_for_decode_room(rig: Rig) -> None:
    hogs = []
    for d in rig.decodes.values():
        assert d.engine is not None
        hog = [1] * ((d.engine.num_free_blocks - 1) * d.cfg.engine.block_size)
        assert await d.engine.reserve("hog", hog, 1, SamplingParams(max_tokens=1), wait=0.0) is not None
        hogs.append(d)
    call = await _start(rig, _prompt(4), rid="gap")
    await _until(lambda: any("gap" in d.service.active for d in rig.decodes.values() if d.service))
    await asyncio.sleep(0.2)  # it waits for room in `AsyncEngine.reserve`
    assert all(_status(d, "gap") is None for d in rig.decodes.values())
    await _cancel(call)
    for d in hogs:
        assert d.engine is not None
        d.engine.abort("hog")
    await rig.wait_free()


async def _transferring(rig: Rig) -> None:
    for d in rig.decodes.values():
        assert d.service is not None
        delay_pulls(d.service, 5.0)
    call = await _start(rig, _prompt(5), rid="xfer")
    await _until(lambda: any(_status(d, "xfer") == RequestStatus.AWAITING_KV for d in rig.decodes.values()))
    await _cancel(call)
    for d in rig.decodes.values():
        assert d.service is not None
        delay_pulls(d.service, 0.0)
    await rig.wait_free()


async def _decoding(rig: Rig) -> None:
    for d in rig.decodes.values():
        assert d.engine is not None
        slow_steps(d.engine, 0.02)
    call = await _start(rig, _prompt(6), max_tokens=150, rid="dec")
    got = 0
    async for _ in call:
        got += 1
        if got == 3:
            break
    assert any(_status(d, "dec") == RequestStatus.RUNNING for d in rig.decodes.values())
    await _cancel(call)
    for d in rig.decodes.values():
        assert d.engine is not None
        slow_steps(d.engine, 0.0)
    await rig.wait_free()


def test_cancel_in_every_state_frees_both_sides_within_1s(model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async def body(rig: Rig) -> None:
        await _queued_and_prefilling(rig)
        await _leased(rig, monkeypatch)
        await _waiting_for_decode_room(rig)
        await _transferring(rig)
        await _decoding(rig)
        msgs = [m async for m in rig.stub.Generate(build_request(LONG_PROMPT, max_tokens=5))]
        assert sum(len(m.token_ids) for m in msgs) == 5  # still serving
        await rig.wait_free()

    _run(model_dir, body)


def test_random_cancels_racing_transfers_never_crash_or_leak(model_dir: Path) -> None:
    """Cancels at random moments (many land while a pull completes): no worker error, nothing left."""
    import random

    async def body(rig: Rig) -> None:
        rng = random.Random(3)

        async def one(i: int) -> None:
            call = await _start(rig, LONG_PROMPT[: rng.randint(5, 60)], max_tokens=rng.randint(2, 20), rid=f"r{i}")
            await asyncio.sleep(rng.random() * 0.05)
            await _cancel(call)

        await asyncio.gather(*(one(i) for i in range(60)))
        await rig.wait_free(within=3.0)
        assert rig.prefill.engine is not None and rig.prefill.engine.error is None
        assert all(d.engine is not None and d.engine.error is None for d in rig.decodes.values())
        msgs = [m async for m in rig.stub.Generate(build_request(LONG_PROMPT, max_tokens=4))]
        assert msgs[-1].finish_reason == router_pb2.LENGTH

    _run(model_dir, body)


def test_release_racing_the_lease_leaves_no_lease_behind(model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A ReleaseKV that lands after prefill finished but before the lease is written (the router gave
    up at that moment): the lease must not be written back over the release, blocks all free."""

    async def body(rig: Rig) -> None:
        service, engine = rig.prefill.service, rig.prefill.engine
        assert service is not None and engine is not None
        inner, loop = engine.engine, asyncio.get_running_loop()
        real = inner.kv_block_ids

        def racing(rid: str) -> list[int]:
            blocks = real(rid)  # the engine thread answers _lease's call; the release is already on its way
            loop.call_soon_threadsafe(lambda: asyncio.ensure_future(service.release(rid)))
            return blocks

        monkeypatch.setattr(inner, "kv_block_ids", racing)
        # straight to the prefill worker: the release above is the requester's only one
        request = worker_pb2.PrefillRequest(request_id="raced", prompt_token_ids=_prompt(7),
                                            sampling=worker_pb2.WorkerSampling(max_tokens=4))
        async with grpc.aio.insecure_channel(rig.prefill.address) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await worker_pb2_grpc.PrefillWorkerStub(channel).Prefill(request, timeout=30)
        assert refused.value.code() == grpc.StatusCode.CANCELLED, refused.value
        monkeypatch.setattr(inner, "kv_block_ids", real)
        await rig.wait_free()
        msgs = [m async for m in rig.stub.Generate(build_request(LONG_PROMPT, max_tokens=3))]
        assert sum(len(m.token_ids) for m in msgs) == 3  # still serving
        await rig.wait_free()

    _run(model_dir, body)


def test_release_cancelled_mid_way_still_frees_the_blocks(model_dir: Path) -> None:
    """A ReleaseKV whose deadline passes while it runs (its handler is cancelled after the lease was
    dropped): the blocks must still be freed, not left held with no lease (the soak's leak)."""

    async def body(rig: Rig) -> None:
        service = rig.prefill.service
        assert service is not None
        request = worker_pb2.PrefillRequest(request_id="kept", prompt_token_ids=_prompt(8),
                                            sampling=worker_pb2.WorkerSampling(max_tokens=4))
        async with grpc.aio.insecure_channel(rig.prefill.address) as channel:
            await worker_pb2_grpc.PrefillWorkerStub(channel).Prefill(request, timeout=30)
        assert "kept" in service.leases
        release = asyncio.ensure_future(service.release("kept"))
        for _ in range(2):  # let it drop the lease and reach its first await, then cancel it there
            await asyncio.sleep(0)
        release.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await release
        await rig.wait_free()

    _run(model_dir, body)


def test_decode_replica_lost_mid_stream_migrates_and_output_is_unchanged(model_dir: Path) -> None:
    async def body(rig: Rig) -> None:
        request = build_request(LONG_PROMPT, max_tokens=60, ignore_eos=True)
        expected = [t async for m in rig.stub.Generate(request) for t in m.token_ids]
        for d in rig.decodes.values():
            assert d.engine is not None
            slow_steps(d.engine, 0.01)
        call = rig.stub.Generate(build_request(LONG_PROMPT, max_tokens=60, ignore_eos=True, request_id="mig"))
        got: list[int] = []
        async for m in call:
            got.extend(m.token_ids)
            if len(got) >= 10 and len(got) - len(m.token_ids) < 10:
                victim = next(k for k, d in rig.decodes.items() if d.service and "mig" in d.service.active)
                del rig.beating[victim]  # stops heartbeating ...
                server = rig.decodes[victim].server
                assert server is not None
                await server.stop(None)  # ... and its connections drop
        assert got == expected
        survivor = next(d for k, d in rig.decodes.items() if k in rig.beating)
        assert survivor.engine is not None
        slow_steps(survivor.engine, 0.0)
        await _until(lambda: not rig.prefill.service.leases if rig.prefill.service else False, 2.0)

    _run(model_dir, body)


def _source_ranks(n: int, delay: float = 0.0) -> tuple[list[Any], list[Any]]:
    """n in-process KV sources (the fake backend's real serving path) and a RankLease for each;
    delay: seconds a lease takes to reach its source (a follower rank is a Ray call away)."""
    from kv_transfer.fake import FakeRegistry, FakeSource
    from prefill_worker.lease import RankLease

    registry, sources, ranks = FakeRegistry(), [], []
    for rank in range(n):
        source = FakeSource(torch.zeros(8, 1, 2, 2 // n, 4, 4), rank, n, 2, registry=registry)

        async def lease(rid: str, blocks: list[int], expiry: float, token: bytes, s: Any = source) -> None:
            await asyncio.sleep(delay)
            s.lease(rid, blocks, expiry, token)

        async def unlease(rid: str, s: Any = source) -> None:
            s.unlease(rid)

        sources.append(source)
        ranks.append(RankLease(rank, f"fake:{rank}", lease, unlease))
    return sources, ranks


def test_lease_state_machine_release_expiry_and_adopt() -> None:
    """running -> leased -> released / expired / adopted: each end frees (or hands over) once, and
    every rank stops serving the blocks."""
    from prefill_worker.lease import Leases, LeaseState

    async def main() -> None:
        sources, ranks = _source_ranks(2)
        freed: list[str] = []
        leases = Leases(ranks, freed.append)
        a = leases.begin("a", b"t")
        assert a.state is LeaseState.RUNNING and leases.in_use("a") and "a" not in leases
        assert not await leases.release("a") and leases.unwanted() == {"a"}  # running: marked only
        a.open(60.0, 0)
        await a.grant([1, 2])
        assert "a" in leases and leases.leased_blocks() == 2
        assert all(s.leased_blocks() == 2 for s in sources)
        assert await leases.release("a") and a.state is LeaseState.RELEASED and freed == ["a"]
        assert all(s.leased_blocks() == 0 for s in sources) and leases.in_use("a")  # call not answered
        leases.answered(a)
        assert not leases.in_use("a") and not await leases.release("a")

        b = leases.begin("b", b"")
        b.open(0.05, 0)
        await b.grant([3])
        leases.answered(b)
        assert leases.running() == frozenset() and len(leases) == 1
        await asyncio.sleep(0.2)
        assert b.state is LeaseState.EXPIRED and freed == ["a", "b"] and not leases.in_use("b")
        assert all(s.leased_blocks() == 0 for s in sources)

        c = leases.begin("c", b"")
        c.open(60.0, 0)
        await c.grant([4])
        leases.answered(c)
        assert leases.adopt("c") and c.state is LeaseState.RELEASED and freed == ["a", "b"]  # handed over
        assert not leases.adopt("c") and len(leases) == 0

    asyncio.run(main())


def test_release_while_ranks_are_told_raises_lease_lost_and_drop_frees_again() -> None:
    from prefill_worker.lease import LeaseLost, Leases

    async def main() -> None:
        sources, ranks = _source_ranks(1, delay=0.05)
        freed: list[str] = []
        leases = Leases(ranks, freed.append)
        lease = leases.begin("r", b"")
        lease.open(60.0, 0)
        grant = asyncio.ensure_future(lease.grant([5, 6]))
        await leases.release("r")  # lands before the rank's lease call ran
        with pytest.raises(LeaseLost):
            await grant
        assert sources[0].leased_blocks() == 2  # the rank was told after the release's unlease
        await lease.drop()
        assert sources[0].leased_blocks() == 0 and freed == ["r", "r"]

    asyncio.run(main())
