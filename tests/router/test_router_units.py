"""Router pieces on their own: validation, request parsing, text streaming, picking, admission."""

from __future__ import annotations

import json
import math

import grpc
import pytest
from pdserve.v1 import router_pb2, worker_pb2

from engine.stop import IncrementalDetokenizer, StopMatcher
from router.admission import Admission, DuplicateRequest, Overloaded
from router.output import OutputState
from router.picker import AffinityMemory, hash_blocks, pick_decode, pick_prefill
from router.registry import DECODE, PREFILL, Registry, RejectedHeartbeat, Replica
from router.status import format_status, status_json
from router.validate import InvalidRequest, prepare
from router.wire import BadRequest, RequestParser
from tests.fake_workers import EOS, VOCAB, ByteCodec, make_config

CFG = make_config(context_len=64)


def _req(prompt: str | list[int] = "hello", **sampling: object) -> router_pb2.GenerateRequest:
    req = router_pb2.GenerateRequest(sampling=router_pb2.SamplingParams(**sampling))  # type: ignore[arg-type]
    if isinstance(prompt, str):
        req.prompt = prompt
    else:
        req.prompt_token_ids.ids.extend(prompt)
    return req


INVALID = [
    ("empty prompt", _req(""), "prompt"),
    ("no input", router_pb2.GenerateRequest(), "prompt"),
    ("empty token list", _req([]), "prompt_token_ids"),
    ("token outside vocab", _req([1, 2, VOCAB]), "prompt_token_ids[2]"),
    ("prompt too long", _req("x" * 64), "prompt"),
    ("token prompt too long", _req([5] * 70), "prompt_token_ids"),
    ("max_tokens 0", _req(max_tokens=0), "sampling.max_tokens"),
    ("prompt+max_tokens over context", _req("hello", max_tokens=60), "sampling.max_tokens"),
    ("negative temperature", _req(temperature=-0.1), "sampling.temperature"),
    ("NaN temperature", _req(temperature=math.nan), "sampling.temperature"),
    ("inf temperature", _req(temperature=math.inf), "sampling.temperature"),
    ("top_p 0", _req(top_p=0.0), "sampling.top_p"),
    ("top_p above 1", _req(top_p=1.5), "sampling.top_p"),
    ("top_p NaN", _req(top_p=math.nan), "sampling.top_p"),
    ("top_k below -1", _req(top_k=-2), "sampling.top_k"),
    ("empty stop string", _req(stop=["ok", ""]), "sampling.stop[1]"),
    ("logprobs above 1", _req(logprobs=5), "sampling.logprobs"),
]


@pytest.mark.parametrize(("case", "req", "field"), INVALID, ids=[c[0] for c in INVALID])
def test_invalid_requests_name_the_field(case: str, req: router_pb2.GenerateRequest, field: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        prepare(req, CFG, ByteCodec())
    assert info.value.field == field
    assert str(info.value).startswith(field + ":")


def test_defaults() -> None:
    prep = prepare(_req("hello"), CFG, ByteCodec())
    assert prep.prompt_ids == tuple(b"hello")
    assert prep.sampling.max_tokens == 64 - 5  # default 256 cut to the room left in the context
    assert prep.sampling.temperature == 0.0 and prep.sampling.top_p == 1.0 and prep.sampling.top_k == -1
    assert not prep.sampling.HasField("seed") and prep.request_id
    full = prepare(_req([1, 2], max_tokens=62, temperature=0.7, top_p=0.9, top_k=0, seed=7), CFG, None)
    assert full.sampling.max_tokens == 62 and full.sampling.top_k == -1 and full.sampling.seed == 7
    assert make_config(context_len=4096).default_max_tokens == 256


def test_request_parser_names_bad_utf8_field() -> None:
    parser = RequestParser()
    good = _req("hi", stop=["ab", "zz"]).SerializeToString()
    assert isinstance(parser.parse(good), router_pb2.GenerateRequest)
    bad_stop = parser.parse(good.replace(b"zz", b"z\xff"))
    assert isinstance(bad_stop, BadRequest) and bad_stop.field == "sampling.stop[1]"
    bad_prompt = parser.parse(good.replace(b"hi", b"\xc3("))
    assert isinstance(bad_prompt, BadRequest) and bad_prompt.field == "prompt"
    garbage = parser.parse(b"\xff\xff\xff")
    assert isinstance(garbage, BadRequest) and "malformed" in garbage.message


def test_incremental_detokenizer_waits_for_whole_characters() -> None:
    detok = IncrementalDetokenizer(ByteCodec(), list(b"hi"))
    pieces = [detok.push(b) for b in "é€x".encode()]
    assert pieces == ["", "é", "", "", "€", "x"]
    detok = IncrementalDetokenizer(ByteCodec(), [])
    assert [detok.push(b) for b in b"a\xe2\x82"] == ["a", "", ""]
    assert detok.flush() == "\ufffd"


def test_stop_matcher_never_lets_a_stop_string_out() -> None:
    m = StopMatcher(["END", "xyz"])
    assert m.feed("hello E") == ("hello ", False)
    assert m.feed("N") == ("", False)
    assert m.feed("x") == ("EN", False)
    assert m.feed("yzzz") == ("", True)
    m = StopMatcher(["END"])
    assert m.feed("aE") == ("a", False) and m.feed("X") == ("EX", False) and m.flush() == ""


def _out(stop: tuple[str, ...] = (), max_tokens: int = 10, ignore_eos: bool = False) -> OutputState:
    prep = prepare(_req("ab", max_tokens=max_tokens, stop=list(stop), ignore_eos=ignore_eos), CFG, ByteCodec())
    return OutputState(prep, ByteCodec(), (EOS,))


def test_output_state_finishes() -> None:
    out = _out(stop=("de",))
    msg = out.accept([ord("c"), ord("d"), ord("e"), ord("f")], [])
    assert msg.text == "c" and list(msg.token_ids) == [99, 100, 101]  # up to the token completing it
    assert msg.finish_reason == router_pb2.STOP and msg.usage.completion_tokens == 3
    out = _out(max_tokens=2)
    assert out.accept([99], []).finish_reason == router_pb2.FINISH_REASON_UNSPECIFIED
    last = out.accept([100, 101, 102], [])
    assert list(last.token_ids) == [100] and last.finish_reason == router_pb2.LENGTH
    out = _out()
    eos = out.accept([99, EOS], [])
    assert eos.finish_reason == router_pb2.STOP and eos.text == "c" and eos.usage.completion_tokens == 2
    out = _out(ignore_eos=True)
    assert out.accept([EOS], []).finish_reason == router_pb2.FINISH_REASON_UNSPECIFIED
    out = _out()
    assert out.accept([99], [], worker_pb2.FINISH_ABORT).finish_reason == router_pb2.ABORT


def test_prefix_hashes_match_the_engine() -> None:
    kv_cache = pytest.importorskip("engine.kv_cache")
    ids = [(i * 7919) % 5000 for i in range(100)]
    assert hash_blocks(ids, 16) == kv_cache.prefix_block_hashes(ids, 16)
    assert hash_blocks(ids, 16, max_blocks=2) == kv_cache.prefix_block_hashes(ids, 16)[:2]


def _status(rid: str, role: int, **fields: object) -> worker_pb2.WorkerStatus:
    base: dict[str, object] = dict(ready=True, block_size=16)
    return worker_pb2.WorkerStatus(replica_id=rid, role=role, address=f"127.0.0.1:{len(rid)}",  # type: ignore[arg-type]
                                   **{**base, **fields})


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _registry() -> tuple[Registry, _Clock]:
    clock = _Clock()
    return Registry(heartbeat_seconds=1.0, block_size=16, clock=clock), clock


def _replicas(reg: Registry, role: int) -> list[Replica]:
    return reg.ready(role)


async def _with_registry_checks() -> None:
    reg, clock = _registry()
    changes: list[bool] = []
    reg.on_change = lambda: changes.append(reg.serving())
    assert reg.heartbeat(_status("p0", PREFILL)) is False
    assert not reg.serving()
    reg.heartbeat(_status("d0", DECODE))
    assert reg.serving() and changes[-1] is True
    clock.now = 2.0
    assert reg.heartbeat(_status("p0", PREFILL)) is True
    clock.now = 3.5  # d0 silent for 3.5 s > 3 heartbeats
    assert reg.expire() == ["d0"] and not reg.serving() and changes[-1] is False
    with pytest.raises(RejectedHeartbeat) as info:
        reg.heartbeat(_status("x", PREFILL, block_size=32))
    assert info.value.code == grpc.StatusCode.FAILED_PRECONDITION
    with pytest.raises(RejectedHeartbeat):
        reg.heartbeat(worker_pb2.WorkerStatus(replica_id="y", address="a:1"))
    reg.heartbeat(_status("d1", DECODE))
    assert reg.serving() and changes[-1] is True
    reg.heartbeat(_status("d1", DECODE, draining=True))  # a draining replica takes no new work
    assert not reg.serving() and changes[-1] is False
    reg.heartbeat(_status("d1", DECODE, ready=False))
    assert not reg.serving()
    reg.heartbeat(_status("d1", DECODE))
    assert reg.serving() and changes[-1] is True
    await reg.close()


def test_registry_forgets_silent_replicas() -> None:
    import asyncio

    asyncio.run(_with_registry_checks())


async def _picking() -> None:
    reg, _ = _registry()
    prompt = list(range(64))
    hashes = hash_blocks(prompt, 16)
    reg.heartbeat(_status("p-idle", PREFILL))
    reg.heartbeat(_status("p-cached", PREFILL, prefix_hashes=hashes[:2], queued_prompt_tokens=100))
    reg.heartbeat(_status("p-busy", PREFILL, prefix_hashes=hashes, queued_prompt_tokens=50_000))
    memory = AffinityMemory()
    ready = _replicas(reg, PREFILL)
    assert pick_prefill(ready, hashes, memory, max_imbalance=2048).replica_id == "p-cached"  # type: ignore[union-attr]
    assert pick_prefill(ready, [], memory, max_imbalance=2048).replica_id == "p-idle"  # type: ignore[union-attr]
    assert pick_prefill(ready, hashes, memory, max_imbalance=0).replica_id == "p-idle"  # type: ignore[union-attr]
    memory.record(hashes, "p-idle")  # the router last sent this whole prefix to p-idle
    assert pick_prefill(ready, hashes, memory, max_imbalance=2048).replica_id == "p-idle"  # type: ignore[union-attr]
    reg.heartbeat(_status("d-small", DECODE, kv_blocks_free=10, running=0))
    reg.heartbeat(_status("d-big", DECODE, kv_blocks_free=500, running=30))
    reg.heartbeat(_status("d-big2", DECODE, kv_blocks_free=500, running=3))
    assert pick_decode(_replicas(reg, DECODE)).replica_id == "d-big2"  # type: ignore[union-attr]
    reg.get("d-big2").reserved_blocks = 50  # type: ignore[union-attr]
    assert pick_decode(_replicas(reg, DECODE)).replica_id == "d-big"  # type: ignore[union-attr]
    reg.heartbeat(_status("d-big", DECODE, kv_blocks_free=500, draining=True))
    assert pick_decode(_replicas(reg, DECODE)).replica_id == "d-big2"  # type: ignore[union-attr]
    await reg.close()


def test_picking_prefers_affinity_then_load_and_free_blocks() -> None:
    import asyncio

    asyncio.run(_picking())


def test_admission_bounds() -> None:
    adm = Admission(max_inflight=2, max_queued_prompt_tokens=100)
    big = adm.admit("big", 500)  # alone in the queue: admitted even though larger than the bound
    with pytest.raises(Overloaded, match="prefill queue full"):
        adm.admit("a", 10)
    big.prefill_done()
    with pytest.raises(DuplicateRequest, match="request_id"):
        adm.admit("big", 10)
    t = adm.admit("t", 10)
    with pytest.raises(Overloaded, match="in flight"):
        adm.admit("b", 1)
    big.close()
    t.close()
    t.close()
    assert adm.inflight == 0 and adm.queued_prompt_tokens == 0 and not adm.request_ids


def test_status_table_and_json() -> None:
    resp = router_pb2.StatusResponse(
        prefill=router_pb2.PoolStatus(replicas=[router_pb2.ReplicaStatus(
            replica_id="p0", address="h:1", ready=True, tp_size=2, kv_blocks_total=100, kv_blocks_free=40,
            weight_bytes=3 * 2**20)], ready_replicas=1, kv_blocks_total=100, kv_blocks_free=40),
        serving=True,
    )
    resp.decode.replicas.add(replica_id="d0", address="h:2", ready=True, kv_pulls=4, kv_pull_seconds=0.01,
                             kv_pull_bytes=2**21)
    resp.scaling_decisions.add(pool="prefill", time=0.0, from_replicas=1, to_replicas=2, reason="queue 5000 > 2048")
    table = format_status(resp)
    assert "p0" in table and "40/100" in table and "3.0MiB" in table and "serving: yes" in table
    assert "4 (2.5ms, 2.0MiB)" in table and "prefill: 1 -> 2 replicas (queue 5000 > 2048)" in table
    data = status_json(resp)
    assert data["prefill"]["kv_blocks_total"] == 100 and data["serving"] is True
    assert json.loads(json.dumps(data))["prefill"]["replicas"][0]["replica_id"] == "p0"
