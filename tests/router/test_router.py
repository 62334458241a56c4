"""The router over real gRPC: fake workers heartbeat into it, a client calls its public API."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from pdserve.v1 import router_pb2, worker_pb2, worker_pb2_grpc

from router.client import build_request
from router.picker import hash_blocks
from tests.fake_workers import EOS, Cluster, FakeDecode, FakePrefill, make_config, start_cluster
from tests.router.test_router_units import INVALID

TIMEOUT = 30


def run(fn: Callable[..., Awaitable[None]]) -> Callable[..., None]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        asyncio.run(asyncio.wait_for(fn(*args, **kwargs), TIMEOUT))
    return wrapper


async def collect(cluster: Cluster, req: router_pb2.GenerateRequest,
                  timeout: float | None = None) -> list[router_pb2.GenerateResponse]:
    return [m async for m in cluster.stub.Generate(req, timeout=timeout)]


async def status_of(cluster: Cluster, req: router_pb2.GenerateRequest) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await collect(cluster, req)
    return info.value.code(), info.value.details() or ""


async def wait_for(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not cond():
        assert asyncio.get_running_loop().time() < deadline, "condition never held"
        await asyncio.sleep(0.01)


def _text(msgs: list[router_pb2.GenerateResponse]) -> str:
    return "".join(m.text for m in msgs)


@run
async def test_every_invalid_request_is_invalid_argument_and_server_still_serves() -> None:
    prefill, decode = FakePrefill(), FakeDecode()
    c = await start_cluster({"p0": prefill}, {"d0": decode}, make_config(context_len=64))
    try:
        for case, req, field in INVALID:
            code, details = await status_of(c, req)
            assert code == grpc.StatusCode.INVALID_ARGUMENT, case
            assert details.startswith(field), (case, details)
        raw = build_request("hi", stop=["ok"]).SerializeToString().replace(b"ok", b"o\xff")
        bad_utf8 = c.channel.unary_stream("/pdserve.v1.Router/Generate")
        with pytest.raises(grpc.aio.AioRpcError) as info:
            [m async for m in bad_utf8(raw)]
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert (info.value.details() or "").startswith("sampling.stop[0]: not valid UTF-8")
        assert prefill.record.requests == [] and decode.record.requests == []  # nothing allocated
        msgs = await collect(c, build_request("abc", max_tokens=4))
        assert _text(msgs) == "defg" and msgs[-1].finish_reason == router_pb2.LENGTH
    finally:
        await c.close()


@run
async def test_health_serving_only_with_both_pools() -> None:
    c = await start_cluster({}, {}, wait=False)
    health = health_pb2_grpc.HealthStub(c.channel)

    async def status() -> int:
        return (await health.Check(health_pb2.HealthCheckRequest(service=""))).status

    try:
        assert await status() == health_pb2.HealthCheckResponse.NOT_SERVING
        await c.add("p0", FakePrefill())
        await c.worker("p0").beat_once()
        assert await status() == health_pb2.HealthCheckResponse.NOT_SERVING
        code, details = await status_of(c, build_request("abc"))
        assert code == grpc.StatusCode.UNAVAILABLE and "decode" in details
        await c.add("d0", FakeDecode())
        await wait_for(lambda: c.router.registry.serving())
        for _ in range(100):  # the health update runs in a task
            if await status() == health_pb2.HealthCheckResponse.SERVING:
                break
            await asyncio.sleep(0.02)
        assert await status() == health_pb2.HealthCheckResponse.SERVING
        named = await health.Check(health_pb2.HealthCheckRequest(service="pdserve.v1.Router"))
        assert named.status == health_pb2.HealthCheckResponse.SERVING
        await c.worker("d0").stop_heartbeats()  # decode pool empties -> NOT_SERVING, replica forgotten
        await wait_for(lambda: c.router.registry.get("d0") is None)
        for _ in range(100):
            if await status() == health_pb2.HealthCheckResponse.NOT_SERVING:
                break
            await asyncio.sleep(0.02)
        assert await status() == health_pb2.HealthCheckResponse.NOT_SERVING
        st = await c.stub.GetStatus(router_pb2.StatusRequest())
        assert [r.replica_id for r in st.prefill.replicas] == ["p0"] and not st.decode.replicas
        assert not st.serving
    finally:
        await c.close()


@run
async def test_streaming_is_incremental_and_length_usage_right() -> None:
    decode = FakeDecode(token_delay=0.05)
    c = await start_cluster({"p0": FakePrefill()}, {"d0": decode})
    try:
        req = build_request("abc", max_tokens=8, logprobs=True, request_id="r1")
        produced_at_first: list[int] = []
        msgs: list[router_pb2.GenerateResponse] = []
        async for m in c.stub.Generate(req):
            if len(msgs) < 2:
                produced_at_first.append(decode.record.produced.get("r1", 0))
            msgs.append(m)
        assert produced_at_first[0] == 0  # the first token streams before decode produced anything
        assert produced_at_first[1] < 7   # the first decode batch arrives before the last token exists
        assert len(msgs) == 8 and all(len(m.token_ids) == 1 for m in msgs)
        assert [t for m in msgs for t in m.token_ids] == list(range(100, 108))
        assert _text(msgs) == "defghijk" and all(m.logprobs for m in msgs)
        assert all(m.finish_reason == router_pb2.FINISH_REASON_UNSPECIFIED for m in msgs[:-1])
        last = msgs[-1]
        assert last.finish_reason == router_pb2.LENGTH
        assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (3, 8)
    finally:
        await c.close()


@run
async def test_stop_string_and_eos_finish() -> None:
    decode = FakeDecode(batch=3)  # the fake ignores stop strings: the router must cut the text
    c = await start_cluster({"p0": FakePrefill()}, {"d0": decode})
    try:
        msgs = await collect(c, build_request("abc", max_tokens=20, stop=["ghi", "zz"], request_id="s1"))
        assert _text(msgs) == "def" and msgs[-1].finish_reason == router_pb2.STOP
        assert [t for m in msgs for t in m.token_ids] == [100, 101, 102, 103, 104, 105]
        assert msgs[-1].usage.completion_tokens == 6
        await wait_for(lambda: "s1" in decode.record.cancelled or "s1" in decode.record.finished)
        decode.eos_after = 4
        msgs = await collect(c, build_request("abc", max_tokens=20))
        assert [t for m in msgs for t in m.token_ids] == [100, 101, 102, EOS]
        assert _text(msgs) == "def" and msgs[-1].finish_reason == router_pb2.STOP
        assert msgs[-1].usage.completion_tokens == 4
        msgs = await collect(c, build_request("abc", max_tokens=6, ignore_eos=True))
        assert EOS in [t for m in msgs for t in m.token_ids] and msgs[-1].finish_reason == router_pb2.LENGTH
    finally:
        await c.close()


@run
async def test_first_token_finishing_releases_kv_without_decode() -> None:
    prefill, decode = FakePrefill(), FakeDecode()
    c = await start_cluster({"p0": prefill}, {"d0": decode})
    try:
        msgs = await collect(c, build_request("abc", max_tokens=1, request_id="one"))
        assert len(msgs) == 1 and msgs[0].text == "d" and msgs[0].finish_reason == router_pb2.LENGTH
        assert msgs[0].usage.completion_tokens == 1
        msgs = await collect(c, build_request([EOS - 1], request_id="eos"))  # first token is EOS
        assert list(msgs[0].token_ids) == [EOS] and msgs[0].finish_reason == router_pb2.STOP
        msgs = await collect(c, build_request("abc", stop=["d"], request_id="stop"))
        assert msgs[0].text == "" and msgs[0].finish_reason == router_pb2.STOP
        await wait_for(lambda: set(prefill.record.released) >= {"one", "eos", "stop"})
        assert decode.record.requests == [] and not prefill.leased
    finally:
        await c.close()


@run
async def test_cancel_mid_stream_reaches_decode() -> None:
    prefill, decode = FakePrefill(), FakeDecode(token_delay=0.05)
    c = await start_cluster({"p0": prefill}, {"d0": decode})
    try:
        call = c.stub.Generate(build_request("abc", max_tokens=100, request_id="c1"))
        got = 0
        async for _ in call:
            got += 1
            if got == 3:
                call.cancel()
                break
        await wait_for(lambda: "c1" in decode.record.cancelled)
        assert "c1" not in decode.record.finished and decode.record.produced["c1"] < 50
        assert await call.code() == grpc.StatusCode.CANCELLED
        await wait_for(lambda: c.router.deps.admission.inflight == 0)
    finally:
        await c.close()


@run
async def test_cancel_between_prefill_and_decode_releases_kv() -> None:
    prefill, decode = FakePrefill(), FakeDecode(pull_delay=5.0)  # decode is stuck "pulling"
    c = await start_cluster({"p0": prefill}, {"d0": decode})
    try:
        call = c.stub.Generate(build_request("abc", max_tokens=10, request_id="c2"))
        first = await call.read()
        assert list(first.token_ids) == [100]
        await wait_for(lambda: "c2" in decode.record.requests)
        call.cancel()
        await wait_for(lambda: "c2" in decode.record.cancelled)
        await wait_for(lambda: "c2" in prefill.record.released)  # the router released the lease
        assert "c2" not in prefill.leased
    finally:
        await c.close()


@run
async def test_deadline_exceeded_in_decode_and_in_prefill() -> None:
    prefill, decode = FakePrefill(), FakeDecode(token_delay=0.1)
    c = await start_cluster({"p0": prefill}, {"d0": decode})
    try:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await collect(c, build_request("abc", max_tokens=100, request_id="d1"), timeout=0.5)
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        await wait_for(lambda: "d1" in decode.record.cancelled)
        prefill.delay = 5.0
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await collect(c, build_request("abc", request_id="d2"), timeout=0.3)
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        await wait_for(lambda: "d2" in prefill.record.cancelled)
        await wait_for(lambda: c.router.deps.admission.inflight == 0)
    finally:
        await c.close()


@run
async def test_admission_resource_exhausted() -> None:
    prefill, decode = FakePrefill(), FakeDecode(token_delay=0.05)
    c = await start_cluster({"p0": prefill}, {"d0": decode}, make_config(max_inflight=1))
    try:
        slow = c.stub.Generate(build_request("abc", max_tokens=10, request_id="slow"))
        await slow.read()
        code, details = await status_of(c, build_request("abc", max_tokens=2))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "in flight" in details
        code, details = await status_of(c, build_request("abc", max_tokens=2, request_id="slow"))
        assert code == grpc.StatusCode.ALREADY_EXISTS and details.startswith("request_id")
        assert len(prefill.record.requests) == 1
        while await slow.read() != grpc.aio.EOF:
            pass
        assert len(await collect(c, build_request("abc", max_tokens=2))) == 2
    finally:
        await c.close()
    prefill = FakePrefill(delay=0.5)
    c = await start_cluster({"p0": prefill}, {"d0": FakeDecode()}, make_config(max_queued_prompt_tokens=40))
    try:
        first = asyncio.ensure_future(collect(c, build_request("a" * 30, max_tokens=2)))
        await wait_for(lambda: len(prefill.record.requests) == 1)
        code, details = await status_of(c, build_request("b" * 20, max_tokens=2))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "prefill queue" in details
        assert len(await first) == 2
    finally:
        await c.close()


@run
async def test_picking_prefix_affinity_and_free_blocks() -> None:
    p0, p1 = FakePrefill(), FakePrefill()
    d_small, d_big = FakeDecode(), FakeDecode()
    c = await start_cluster({}, {}, wait=False)
    prompt = "The quick brown fox jumps over the lazy dog, twice over."  # 3 full blocks of 16
    hashes = hash_blocks(list(prompt.encode()), 16)
    try:
        await c.add("p0", p0)
        await c.add("p1", p1, prefix_hashes=hashes[:2])  # p1 reports it caches this prefix
        await c.add("d-small", d_small, kv_blocks_free=100)
        await c.add("d-big", d_big, kv_blocks_free=900)
        await c.wait_serving()
        await wait_for(lambda: len(c.router.registry.replicas) == 4)
        await collect(c, build_request(prompt + " one", max_tokens=3, request_id="a1"))
        assert p1.record.requests == ["a1"] and d_big.record.requests == ["a1"]
        await collect(c, build_request("another prompt altogether, with its own prefix here", max_tokens=2,
                                       request_id="a2"))
        other = "p0" if p0.record.requests else "p1"
        other_prompt = "another prompt altogether, with its own prefix here, and more"
        await collect(c, build_request(other_prompt, max_tokens=2, request_id="a3"))  # router memory
        assert ("a3" in p0.record.requests) == (other == "p0")
        assert d_small.record.requests == []
    finally:
        await c.close()


@run
async def test_unreachable_prefill_replica_is_retried_elsewhere() -> None:
    good, dead = FakePrefill(), FakePrefill()
    c = await start_cluster({"p-good": good, "p-dead": dead}, {"d0": FakeDecode()})
    try:
        await c.worker("p-dead").server.stop(None)  # still registered, no longer answers
        c.router.registry.get("p-good").outstanding_prompt_tokens = 10_000  # type: ignore[union-attr]
        msgs = await collect(c, build_request("abc", max_tokens=2, request_id="x"))
        assert msgs[-1].finish_reason == router_pb2.LENGTH and good.record.requests == ["x"]
        c.router.registry.get("p-good").outstanding_prompt_tokens = 0  # type: ignore[union-attr]
    finally:
        await c.close()


@run
async def test_reflection_and_bad_heartbeat() -> None:
    c = await start_cluster({"p0": FakePrefill()}, {"d0": FakeDecode()})
    try:
        stub = reflection_pb2_grpc.ServerReflectionStub(c.channel)
        responses = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        names = {s.name async for r in responses for s in r.list_services_response.service}
        assert {"pdserve.v1.Router", "grpc.health.v1.Health"} <= names
        bad = await c.add("p-bad", FakePrefill(), block_size=32)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await bad.beat_once()
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "block_size" in (info.value.details() or "")
        assert c.router.registry.get("p-bad") is None
        async with grpc.aio.insecure_channel(c.router.internal_address) as internal:
            registry = worker_pb2_grpc.RegistryStub(internal)
            decision = router_pb2.ScalingDecision(pool="decode", time=1.0, from_replicas=1, to_replicas=3,
                                                  reason="KV use 0.9 > 0.7")
            assert (await registry.ReportScaling(decision)).known
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await registry.ReportScaling(router_pb2.ScalingDecision(pool="both"))
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            # A router no `pdserve up` runs has nothing to apply a file to: a clear refusal.
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await registry.Apply(worker_pb2.ApplyRequest(source="new.yaml", config_json="{}"))
            assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED and "pdserve up" in (info.value.details() or "")
        status = await c.stub.GetStatus(router_pb2.StatusRequest())
        assert [d.reason for d in status.scaling_decisions] == ["KV use 0.9 > 0.7"]
    finally:
        await c.close()


@run
async def test_client_helpers() -> None:
    from router import client

    c = await start_cluster({"p0": FakePrefill()}, {"d0": FakeDecode(batch=2)})
    try:
        address = c.router.address
        await asyncio.to_thread(client.wait_healthy, address, 5.0)
        done = await asyncio.to_thread(client.generate, address, "abc", max_tokens=5, seed=1, temperature=0.5)
        assert done.text == "defgh" and done.finish_reason == "length" and done.completion_tokens == 5
        chunks = await asyncio.to_thread(lambda: list(client.generate_stream(address, [97], max_tokens=3)))
        assert chunks[-1].finish_reason == "length" and chunks[-1].usage == (1, 3)
        status = await asyncio.to_thread(client.get_status, address)
        assert status.serving and "p0" in client.format_status(status)
        with pytest.raises(grpc.RpcError):
            await asyncio.to_thread(lambda: list(client.generate_stream(address, "", max_tokens=3)))
    finally:
        await c.close()


@run
async def test_worker_errors_map_to_clear_statuses() -> None:
    prefill, decode = FakePrefill(), FakeDecode()
    c = await start_cluster({"p0": prefill}, {"d0": decode})
    try:
        prefill.fail = (grpc.StatusCode.RESOURCE_EXHAUSTED, "KV cache full")
        code, details = await status_of(c, build_request("abc"))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and details == "prefill replica p0: RESOURCE_EXHAUSTED: KV cache full"
        prefill.fail = (grpc.StatusCode.UNKNOWN, "boom")
        code, details = await status_of(c, build_request("abc"))
        assert code == grpc.StatusCode.INTERNAL and "p0" in details and "boom" in details
        prefill.fail = None
        decode.fail = (grpc.StatusCode.INTERNAL, "pull failed")
        got: list[router_pb2.GenerateResponse] = []
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for m in c.stub.Generate(build_request("abc", max_tokens=10)):
                got.append(m)
        assert info.value.code() == grpc.StatusCode.INTERNAL
        assert info.value.details() == "decode replica d0: INTERNAL: pull failed"
        assert len(got) == 2  # the first token, then the one decode message before the failure
        await wait_for(lambda: c.router.deps.admission.inflight == 0)
    finally:
        await c.close()


@pytest.fixture(scope="module")
def bpe_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """helper A's byte-level BPE tokenizer.json through engine.tokenizer.Tokenizer."""
    make_model = pytest.importorskip("engine.make_model")
    tokenizer = pytest.importorskip("engine.tokenizer")
    folder = tmp_path_factory.mktemp("bpe")
    make_model.write_tokenizer(folder)
    return tokenizer.Tokenizer(folder / "tokenizer.json", eos_token_ids=(0,))


def test_real_tokenizer_text_streams_whole_characters(bpe_tokenizer: Any) -> None:
    target = " the café costs 3€. The end of it"
    script = bpe_tokenizer.encode(target)

    async def body() -> None:
        cfg = make_config(vocab_size=1024, eos_token_ids=(0,))
        c = await start_cluster({"p0": FakePrefill(script=script)}, {"d0": FakeDecode(script=script)}, cfg,
                                codec=bpe_tokenizer)
        try:
            prompt = "Hello world,"
            msgs = await collect(c, build_request(prompt, max_tokens=len(script)))
            assert msgs[-1].usage.prompt_tokens == len(bpe_tokenizer.encode(prompt))
            assert [t for m in msgs for t in m.token_ids] == script
            assert _text(msgs) == target and not any("\ufffd" in m.text for m in msgs)
            msgs = await collect(c, build_request(prompt, max_tokens=len(script), stop=["end", "€€"]))
            assert _text(msgs) == " the café costs 3€. The " and msgs[-1].finish_reason == router_pb2.STOP
        finally:
            await c.close()

    asyncio.run(asyncio.wait_for(body(), TIMEOUT))


@run
async def test_decode_without_room_moves_to_another_replica() -> None:
    prefill, full, spare = FakePrefill(), FakeDecode(), FakeDecode()
    full.reject = (grpc.StatusCode.RESOURCE_EXHAUSTED, "no KV blocks")
    c = await start_cluster({}, {}, wait=False)
    try:
        await c.add("p0", prefill)
        await c.add("d-full", full, kv_blocks_free=900)  # looks best, but refuses
        await c.add("d-spare", spare, kv_blocks_free=100)
        await c.wait_serving()
        await wait_for(lambda: len(c.router.registry.replicas) == 3)
        msgs = await collect(c, build_request("abc", max_tokens=4, request_id="m1"))
        assert _text(msgs) == "defg" and full.record.requests == ["m1"] and spare.record.finished == ["m1"]
        assert prefill.record.released == ["m1"]  # released once, by the decode that pulled
        spare.reject = full.reject
        code, details = await status_of(c, build_request("abc", max_tokens=4, request_id="m2"))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "no KV blocks" in details
        await wait_for(lambda: "m2" in prefill.record.released)  # the router gave the lease back
    finally:
        await c.close()


@run
async def test_taken_port_is_a_clear_error() -> None:
    from router.server import RouterServer
    from tests.fake_workers import ByteCodec

    first = RouterServer(make_config(), ByteCodec())
    await first.start()
    try:
        second = RouterServer(make_config(port=first.port), ByteCodec())
        with pytest.raises(OSError, match=f"cannot bind 127.0.0.1:{first.port}"):
            await second.start()
        await second.stop(0)
    finally:
        await first.stop(0)
