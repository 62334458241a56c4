"""Every stand-in the tests use in place of a worker or of what a worker talks to (one module).

FakePrefill / FakeDecode: in-process gRPC worker servers for the router's tests, on a scripted model:
the next token is (last + 1) % vocab_size, except that the decode fake emits `eos_id` as completion
token number `eos_after` (when set). Each fake is a real grpc.aio server on 127.0.0.1:0 that
heartbeats a WorkerStatus into the router's Registry, and records what reached it (requests,
cancellations, ReleaseKV) so tests can assert on the worker side.

beat_into(router, replicas, seconds): the heartbeats that Serve's wrapper sends for real replicas
run in a test's own process. FakeRegistry: records the ScalingDecisions an autoscaling policy
reports. SlowRank: a decode follower rank's transport as a Ray actor that sleeps where a pull
would write and records how its call ended.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import grpc
from pdserve.v1 import kv_pb2, router_pb2, router_pb2_grpc, worker_pb2, worker_pb2_grpc

from kv_transfer.interfaces import TransferError
from router.config import RouterConfig
from router.server import RouterServer
from router.tokenizer import TextCodec

VOCAB = 300
EOS = 299


class ByteCodec:
    """Test tokenizer: ids 0..255 are bytes, ids >= 256 are specials that decode to nothing."""

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


def next_token(last: int, vocab: int = VOCAB) -> int:
    return (last + 1) % vocab


@dataclass
class Record:
    """What reached a fake worker."""

    requests: list[str] = field(default_factory=list)
    cancelled: list[str] = field(default_factory=list)
    released: list[str] = field(default_factory=list)
    finished: list[str] = field(default_factory=list)
    produced: dict[str, int] = field(default_factory=dict)  # decode: tokens generated so far
    started: asyncio.Event = field(default_factory=asyncio.Event)


class FakePrefill(worker_pb2_grpc.PrefillWorkerServicer):
    """`script`: the completion to produce (its first token here), instead of last + 1."""

    def __init__(self, delay: float = 0.0, vocab: int = VOCAB, script: Sequence[int] = ()) -> None:
        self.delay = delay
        self.vocab = vocab
        self.script = tuple(script)
        self.record = Record()
        self.leased: set[str] = set()
        self.fail: tuple[grpc.StatusCode, str] | None = None  # answer Prefill with this error

    async def Prefill(self, request: worker_pb2.PrefillRequest,  # noqa: N802
                      context: grpc.aio.ServicerContext) -> worker_pb2.PrefillResponse:
        rid = request.request_id
        self.record.requests.append(rid)
        self.record.started.set()
        try:
            await asyncio.sleep(self.delay)
        except asyncio.CancelledError:
            self.record.cancelled.append(rid)
            raise
        if self.fail is not None:
            await context.abort(*self.fail)
        self.leased.add(rid)
        handle = kv_pb2.KVHandle(request_id=rid, num_tokens=len(request.prompt_token_ids), block_size=16)
        return worker_pb2.PrefillResponse(
            request_id=rid,
            first_token=self.script[0] if self.script else next_token(request.prompt_token_ids[-1], self.vocab),
            first_logprob=-0.5, kv=handle,
        )

    async def ReleaseKV(self, request: worker_pb2.ReleaseKVRequest,  # noqa: N802
                        context: grpc.aio.ServicerContext) -> worker_pb2.ReleaseKVResponse:
        self.record.released.append(request.request_id)
        released = request.request_id in self.leased
        self.leased.discard(request.request_id)
        return worker_pb2.ReleaseKVResponse(released=released)


class FakeDecode(worker_pb2_grpc.DecodeWorkerServicer):
    """Streams `batch` tokens per message every `token_delay` s after a `pull_delay` s 'KV pull'.

    It does not enforce stop strings (the router must), so tests see the router do it."""

    def __init__(self, token_delay: float = 0.0, pull_delay: float = 0.0, batch: int = 1,
                 eos_after: int | None = None, vocab: int = VOCAB, script: Sequence[int] = ()) -> None:
        self.script = tuple(script)  # completion tokens (index 0 came from prefill), then last + 1
        self.token_delay = token_delay
        self.pull_delay = pull_delay
        self.batch = batch
        self.eos_after = eos_after
        self.vocab = vocab
        self.record = Record()
        self.fail: tuple[grpc.StatusCode, str] | None = None  # fail the stream after one message
        self.reject: tuple[grpc.StatusCode, str] | None = None  # refuse before pulling (no room)

    def _token(self, last: int, n: int) -> int:
        if n - 1 < len(self.script):
            return self.script[n - 1]
        return EOS if self.eos_after is not None and n == self.eos_after else next_token(last, self.vocab)

    async def Decode(self, request: worker_pb2.DecodeRequest,  # noqa: N802
                     context: grpc.aio.ServicerContext) -> None:
        rid = request.request_id
        self.record.requests.append(rid)
        self.record.started.set()
        if self.reject is not None:
            await context.abort(*self.reject)
        try:
            await asyncio.sleep(self.pull_delay)
            await _release(request.prefill_address, rid)
            await self._stream(request, context)
            self.record.finished.append(rid)
        except asyncio.CancelledError:
            self.record.cancelled.append(rid)
            raise

    async def _stream(self, request: worker_pb2.DecodeRequest, context: grpc.aio.ServicerContext) -> None:
        rid, sp = request.request_id, request.sampling
        last, n = request.first_token, 1
        finish = worker_pb2.FINISH_NONE
        while finish == worker_pb2.FINISH_NONE:
            tokens: list[int] = []
            while len(tokens) < self.batch and finish == worker_pb2.FINISH_NONE:
                n += 1
                last = self._token(last, n)
                tokens.append(last)
                if last == EOS and not sp.ignore_eos:
                    finish = worker_pb2.FINISH_STOP
                elif n >= sp.max_tokens:
                    finish = worker_pb2.FINISH_LENGTH
            await asyncio.sleep(self.token_delay)
            self.record.produced[rid] = n - 1
            await context.write(worker_pb2.DecodeResponse(
                token_ids=tokens, logprobs=[-1.0] * len(tokens), finish_reason=finish))
            if self.fail is not None:
                await context.abort(*self.fail)


async def _release(prefill_address: str, request_id: str) -> None:
    async with grpc.aio.insecure_channel(prefill_address) as channel:
        stub = worker_pb2_grpc.PrefillWorkerStub(channel)
        await stub.ReleaseKV(worker_pb2.ReleaseKVRequest(request_id=request_id), timeout=5)


class FakeWorker:
    """A fake's gRPC server plus its heartbeat loop into the router's Registry."""

    def __init__(self, replica_id: str, servicer: FakePrefill | FakeDecode, registry_address: str,
                 heartbeat_seconds: float, **status: object) -> None:
        self.replica_id = replica_id
        self.servicer = servicer
        self.registry_address = registry_address
        self.heartbeat_seconds = heartbeat_seconds
        self.status_fields = dict(status)  # WorkerStatus fields to report (kv_blocks_free=..., ...)
        self.server = grpc.aio.server()
        self.address = ""
        self._beat: asyncio.Task[None] | None = None

    @property
    def role(self) -> int:
        is_prefill = isinstance(self.servicer, FakePrefill)
        return worker_pb2.WorkerStatus.PREFILL if is_prefill else worker_pb2.WorkerStatus.DECODE

    def status(self) -> worker_pb2.WorkerStatus:
        defaults: dict[str, object] = dict(ready=True, tp_size=1, kv_blocks_total=1000,
                                           kv_blocks_free=1000, block_size=16, kv_dtype="float32")
        return worker_pb2.WorkerStatus(replica_id=self.replica_id, role=self.role, address=self.address,
                                       **{**defaults, **self.status_fields})  # type: ignore[arg-type]

    async def start(self) -> None:
        if isinstance(self.servicer, FakePrefill):
            worker_pb2_grpc.add_PrefillWorkerServicer_to_server(self.servicer, self.server)
        else:
            worker_pb2_grpc.add_DecodeWorkerServicer_to_server(self.servicer, self.server)
        self.address = f"127.0.0.1:{self.server.add_insecure_port('127.0.0.1:0')}"
        await self.server.start()
        self._beat = asyncio.get_running_loop().create_task(self._heartbeats())

    async def beat_once(self) -> None:
        async with grpc.aio.insecure_channel(self.registry_address) as channel:
            await worker_pb2_grpc.RegistryStub(channel).Heartbeat(self.status(), timeout=5)

    async def _heartbeats(self) -> None:
        async with grpc.aio.insecure_channel(self.registry_address) as channel:
            stub = worker_pb2_grpc.RegistryStub(channel)
            while True:
                with contextlib.suppress(grpc.aio.AioRpcError):
                    await stub.Heartbeat(self.status(), timeout=5)
                await asyncio.sleep(self.heartbeat_seconds)

    async def stop_heartbeats(self) -> None:
        if self._beat is not None:
            self._beat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._beat
            self._beat = None

    async def stop(self) -> None:
        await self.stop_heartbeats()
        await self.server.stop(None)


class Cluster:
    """A RouterServer (ByteCodec tokenizer) with fake workers heartbeating into it, and a client stub."""

    def __init__(self, router: RouterServer, workers: list[FakeWorker]) -> None:
        self.router = router
        self.workers = workers
        self.channel = grpc.aio.insecure_channel(router.address)
        self.stub = router_pb2_grpc.RouterStub(self.channel)

    def worker(self, replica_id: str) -> FakeWorker:
        return next(w for w in self.workers if w.replica_id == replica_id)

    async def add(self, replica_id: str, servicer: FakePrefill | FakeDecode, **status: object) -> FakeWorker:
        worker = FakeWorker(replica_id, servicer, self.router.internal_address,
                            self.router.config.heartbeat_seconds, **status)
        await worker.start()
        self.workers.append(worker)
        return worker

    async def wait_serving(self, timeout: float = 5.0) -> None:
        deadline = asyncio.get_running_loop().time() + timeout
        while not self.router.registry.serving():
            if asyncio.get_running_loop().time() > deadline:
                raise TimeoutError("router never saw both pools")
            await asyncio.sleep(0.01)

    async def close(self) -> None:
        await self.channel.close()
        for w in self.workers:
            await w.stop()
        await self.router.stop(0)


def make_config(**overrides: object) -> RouterConfig:
    base: dict[str, object] = dict(vocab_size=VOCAB, context_len=128, block_size=16, eos_token_ids=(EOS,),
                                   port=0, heartbeat_seconds=0.1)
    return RouterConfig(**{**base, **overrides})  # type: ignore[arg-type]


async def start_cluster(prefills: dict[str, FakePrefill], decodes: dict[str, FakeDecode],
                        config: RouterConfig | None = None, wait: bool = True,
                        codec: TextCodec | None = None) -> Cluster:
    router = RouterServer(config or make_config(), codec or ByteCodec())
    await router.start()
    cluster = Cluster(router, [])
    servicers: dict[str, FakePrefill | FakeDecode] = {**prefills, **decodes}
    for rid, servicer in servicers.items():
        await cluster.add(rid, servicer)
    if wait:
        await cluster.wait_serving()
    return cluster


class Reporting(Protocol):
    """A real replica as its heartbeat sees it."""

    def status(self, replica_id: str) -> worker_pb2.WorkerStatus: ...


async def beat_into(router: RouterServer, replicas: Mapping[str, Reporting], seconds: float) -> None:
    """Heartbeat every replica of `replicas` (read afresh each round) into the router until cancelled."""
    async with grpc.aio.insecure_channel(router.internal_address) as channel:
        stub = worker_pb2_grpc.RegistryStub(channel)
        while True:
            for rid, replica in list(replicas.items()):
                with contextlib.suppress(grpc.aio.AioRpcError):
                    await stub.Heartbeat(replica.status(rid), timeout=5)
            await asyncio.sleep(seconds)


class FakeRegistry(worker_pb2_grpc.RegistryServicer):
    """The router's Registry as an autoscaling policy sees it: keeps each ScalingDecision."""

    def __init__(self) -> None:
        self.got: list[router_pb2.ScalingDecision] = []

    async def ReportScaling(self, request: router_pb2.ScalingDecision,  # noqa: N802
                            context: grpc.aio.ServicerContext) -> worker_pb2.HeartbeatAck:
        self.got.append(request)
        return worker_pb2.HeartbeatAck(known=True)


class SlowRank:
    """A follower whose pull takes `seconds` (or fails at once with fail=True)."""

    def __init__(self) -> None:
        self.seconds, self.fail = 0.0, False
        self.ended: str | None = None

    def configure(self, seconds: float, fail: bool) -> None:
        self.seconds, self.fail, self.ended = seconds, fail, None

    async def pull(self, handle: bytes, blocks: list[int], timeout: float, first_block: int) -> None:
        if self.fail:
            raise TransferError("source refused")
        try:
            await asyncio.sleep(self.seconds)
            self.ended = "done"
        except asyncio.CancelledError:
            await asyncio.sleep(0.3)  # like UCX aborting its receives: the end takes a moment
            self.ended = "cancelled"
            raise

    def how_ended(self) -> str | None:
        return self.ended
