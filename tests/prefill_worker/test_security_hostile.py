"""Hostile input to every server of a deployment (router, prefill and decode gRPC, the UCX KV source):
rejected with a clear status, nothing allocated, and the servers keep serving.

Uses the in-process rig of test_reliability_workers (real replicas, KV over UCX, no Ray).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import numpy as np
from pdserve.v1 import kv_pb2, router_pb2, worker_pb2, worker_pb2_grpc

from router.client import build_request
from tests.prefill_worker.test_reliability_workers import LONG_PROMPT, Rig, _run

BIG = b"\x00" * (5 << 20)  # over every server's 4 MiB limit


async def _code(aw: object) -> grpc.StatusCode:
    try:
        await aw  # type: ignore[misc]
    except grpc.aio.AioRpcError as e:
        return e.code()
    return grpc.StatusCode.OK


async def _raw(channel: grpc.aio.Channel, method: str, data: bytes) -> grpc.StatusCode:
    call = channel.unary_unary(method, request_serializer=None, response_deserializer=None)
    return await _code(call(data, timeout=10))


async def _raw_stream(channel: grpc.aio.Channel, method: str, data: bytes) -> grpc.StatusCode:
    call = channel.unary_stream(method, request_serializer=None, response_deserializer=None)(data, timeout=10)
    try:
        async for _ in call:
            pass
    except grpc.aio.AioRpcError as e:
        return e.code()
    return grpc.StatusCode.OK


async def _router(rig: Rig) -> None:
    async with grpc.aio.insecure_channel(rig.router.address) as ch:
        gen = "/pdserve.v1.Router/Generate"
        assert await _raw_stream(ch, gen, BIG) == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert await _raw_stream(ch, gen, b"\xff\xff\xff garbage") == grpc.StatusCode.INVALID_ARGUMENT
        wrong_type = worker_pb2.WorkerStatus(replica_id="x" * 100, ready=True).SerializeToString()
        assert await _raw_stream(ch, gen, wrong_type) == grpc.StatusCode.INVALID_ARGUMENT
        huge = build_request(list(range(1, 1000)) * 300, max_tokens=1)  # 300k ids, under 4 MiB
        assert await _raw_stream(ch, gen, huge.SerializeToString()) == grpc.StatusCode.INVALID_ARGUMENT
        many_stops = build_request("hi", max_tokens=1, stop=["x"] * 100_000)
        assert await _raw_stream(ch, gen, many_stops.SerializeToString()) == grpc.StatusCode.INVALID_ARGUMENT
        assert await _raw(ch, "/pdserve.v1.Router/GetStatus", BIG) == grpc.StatusCode.RESOURCE_EXHAUSTED


async def _prefill(rig: Rig) -> None:
    async with grpc.aio.insecure_channel(rig.prefill.address) as ch:
        stub = worker_pb2_grpc.PrefillWorkerStub(ch)
        sampling = worker_pb2.WorkerSampling(max_tokens=4)
        for prompt in ([10**9], [], [5] * 100_000):  # outside the vocabulary, empty, longer than the context
            req = worker_pb2.PrefillRequest(request_id="h", prompt_token_ids=prompt, sampling=sampling)
            assert await _code(stub.Prefill(req, timeout=10)) == grpc.StatusCode.INVALID_ARGUMENT
        assert await _raw(ch, "/pdserve.v1.PrefillWorker/Prefill", BIG) == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert await _raw(ch, "/pdserve.v1.PrefillWorker/Prefill", b"\xff\x01junk") != grpc.StatusCode.OK
        released = await stub.ReleaseKV(worker_pb2.ReleaseKVRequest(request_id="never-existed"), timeout=10)
        assert not released.released


def _handle(rig: Rig, rid: str, blocks: list[int], num_tokens: int) -> kv_pb2.KVHandle:
    llm = rig.prefill.engine.engine  # type: ignore[union-attr]
    cfg = llm.model_config
    handle = kv_pb2.KVHandle(request_id=rid, num_tokens=num_tokens, block_size=llm.cache_config.block_size,
                             num_layers=cfg.num_layers, num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
                             dtype="float32", tp_size=1, lease_expiry=1e12)
    handle.shards.add(rank=0, endpoint=_endpoint(rig), block_ids=blocks)
    return handle


def _endpoint(rig: Rig) -> str:
    listener = rig.prefill.sources[0]._listener  # type: ignore[attr-defined]
    return f"127.0.0.1:{listener.port}"


async def _decode(rig: Rig) -> None:
    d = next(iter(rig.decodes.values()))
    async with grpc.aio.insecure_channel(d.address) as ch:
        stub = worker_pb2_grpc.DecodeWorkerStub(ch)
        prompt = list(range(1, 33))  # 2 blocks of 16
        sampling = worker_pb2.WorkerSampling(max_tokens=4)
        cases = [
            ("wrong-id", dict(kv=_handle(rig, "someone-else", [0, 1], 32)), grpc.StatusCode.INVALID_ARGUMENT),
            ("bad-first", dict(kv=_handle(rig, "bad-first", [0, 1], 32), first_token=10**9),
             grpc.StatusCode.INVALID_ARGUMENT),
            ("short", dict(kv=_handle(rig, "short", [0], 16)), grpc.StatusCode.INVALID_ARGUMENT),
            ("unleased", dict(kv=_handle(rig, "unleased", [0, 1], 32)), grpc.StatusCode.UNAVAILABLE),
            ("out-of-range", dict(kv=_handle(rig, "out-of-range", [10**6, 10**6 + 1], 32)),
             grpc.StatusCode.UNAVAILABLE),
        ]
        for rid, fields, code in cases:
            req = worker_pb2.DecodeRequest(request_id=rid, prompt_token_ids=prompt, sampling=sampling, **fields)
            got = await _code(_drain(stub.Decode(req, timeout=10)))
            assert got == code, (rid, got)
        assert await _raw_stream(ch, "/pdserve.v1.DecodeWorker/Decode", BIG) == grpc.StatusCode.RESOURCE_EXHAUSTED


async def _drain(call: object) -> None:
    async for _ in call:  # type: ignore[attr-defined]
        pass


async def _ucx_source(rig: Rig) -> None:
    """Raw PullRequests to the prefill rank's UCX listener: refused, and the source goes on."""
    from kv_transfer.ucx_loop import on_ucx_loop

    await on_ucx_loop(_ucx_source_on_loop(rig))


async def _ucx_source_on_loop(rig: Rig) -> None:
    import ucxx

    from kv_transfer.ucx import recv_message, send_message

    host, _, port = _endpoint(rig).rpartition(":")
    ep = await ucxx.create_endpoint(host, int(port), endpoint_error_handling=True)
    try:
        for data in (b"\xff\xfe garbage",
                     kv_pb2.PullRequest(request_id="ghost", block_ids=[0], head_start=0, head_end=1).SerializeToString(),
                     kv_pb2.PullRequest(request_id="ghost", block_ids=[10**9] * 1000).SerializeToString()):
            await send_message(ep, data)
            reply = kv_pb2.PullResponse.FromString(await recv_message(ep, 1 << 20) or b"")
            assert not reply.ok and reply.error
        await ep.send(np.array([1 << 40], dtype="<u8"))  # announces a 1 TiB request
        reply = kv_pb2.PullResponse.FromString(await recv_message(ep, 1 << 20) or b"")
        assert not reply.ok and "too large" in reply.error
    finally:
        ep.abort()


def test_hostile_messages_are_rejected_and_every_server_keeps_serving(model_dir: Path) -> None:
    async def body(rig: Rig) -> None:
        await _router(rig)
        await _prefill(rig)
        await _decode(rig)
        await _ucx_source(rig)
        await rig.wait_free(within=2.0)
        msgs = [m async for m in rig.stub.Generate(build_request(LONG_PROMPT, max_tokens=5))]
        assert msgs[-1].finish_reason == router_pb2.LENGTH and sum(len(m.token_ids) for m in msgs) == 5
        assert rig.prefill.engine is not None and rig.prefill.engine.error is None
        await asyncio.sleep(0)

    _run(model_dir, body)
