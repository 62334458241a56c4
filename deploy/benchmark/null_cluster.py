"""A real router with model-free workers: the data plane alone (benchmarks, bench tests).

    cluster = await start_null_cluster(tokens_per_message=1)   # cluster.address -> "127.0.0.1:PORT"
    ...; await cluster.stop()

NullPrefill answers Prefill at once (first token, an empty KV handle, nothing leased). NullDecode
streams max_tokens - 1 more tokens as fast as gRPC takes them, `tokens_per_message` per
DecodeResponse (1 = one message per token, the worst case for the data plane). Both are plain
grpc.aio servers on 127.0.0.1:0 that heartbeat a WorkerStatus into the router's Registry, like the
real replicas; the router (validation, admission, picking, streaming) is the real one.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc
from pdserve.v1 import kv_pb2, worker_pb2, worker_pb2_grpc

from router.config import RouterConfig
from router.server import RouterServer

VOCAB = 32000
BLOCK_SIZE = 16


class NullPrefill(worker_pb2_grpc.PrefillWorkerServicer):
    async def Prefill(self, request: worker_pb2.PrefillRequest,  # noqa: N802 - gRPC method name
                      context: grpc.aio.ServicerContext) -> worker_pb2.PrefillResponse:
        n = len(request.prompt_token_ids)
        kv = kv_pb2.KVHandle(request_id=request.request_id, num_tokens=n, block_size=BLOCK_SIZE)
        first = (request.prompt_token_ids[-1] + 1) % VOCAB
        return worker_pb2.PrefillResponse(request_id=request.request_id, first_token=first, kv=kv)

    async def ReleaseKV(self, request: worker_pb2.ReleaseKVRequest,  # noqa: N802
                        context: grpc.aio.ServicerContext) -> worker_pb2.ReleaseKVResponse:
        return worker_pb2.ReleaseKVResponse(released=False)


class NullDecode(worker_pb2_grpc.DecodeWorkerServicer):
    def __init__(self, tokens_per_message: int = 1) -> None:
        self.tokens_per_message = tokens_per_message

    async def Decode(self, request: worker_pb2.DecodeRequest,  # noqa: N802
                     context: grpc.aio.ServicerContext) -> AsyncIterator[worker_pb2.DecodeResponse]:
        left = max(0, request.sampling.max_tokens - 1)  # the first token came from prefill
        token = request.first_token
        while left > 0:
            k = min(self.tokens_per_message, left)
            ids = [(token + i + 1) % VOCAB for i in range(k)]
            token, left = ids[-1], left - k
            finish = worker_pb2.FINISH_LENGTH if left == 0 else worker_pb2.FINISH_NONE
            yield worker_pb2.DecodeResponse(token_ids=ids, finish_reason=finish)


@dataclass
class NullWorker:
    """One null servicer's gRPC server and its heartbeat loop."""

    replica_id: str
    servicer: NullPrefill | NullDecode
    server: grpc.aio.Server = field(default_factory=grpc.aio.server)
    address: str = ""
    _beat: asyncio.Task[None] | None = None

    def status(self) -> worker_pb2.WorkerStatus:
        is_prefill = isinstance(self.servicer, NullPrefill)
        role = worker_pb2.WorkerStatus.PREFILL if is_prefill else worker_pb2.WorkerStatus.DECODE
        return worker_pb2.WorkerStatus(
            replica_id=self.replica_id, role=role, address=self.address, ready=True, tp_size=1,
            kv_blocks_total=1 << 20, kv_blocks_free=1 << 20, block_size=BLOCK_SIZE,
            kv_dtype="float32", quantization="none", model_fingerprint="null")

    async def start(self, registry_address: str, heartbeat_seconds: float) -> None:
        if isinstance(self.servicer, NullPrefill):
            worker_pb2_grpc.add_PrefillWorkerServicer_to_server(self.servicer, self.server)
        else:
            worker_pb2_grpc.add_DecodeWorkerServicer_to_server(self.servicer, self.server)
        self.address = f"127.0.0.1:{self.server.add_insecure_port('127.0.0.1:0')}"
        await self.server.start()
        loop = asyncio.get_running_loop()
        self._beat = loop.create_task(self._heartbeats(registry_address, heartbeat_seconds))

    async def _heartbeats(self, registry_address: str, period: float) -> None:
        async with grpc.aio.insecure_channel(registry_address) as channel:
            stub = worker_pb2_grpc.RegistryStub(channel)
            while True:
                with contextlib.suppress(grpc.aio.AioRpcError):
                    await stub.Heartbeat(self.status(), timeout=5)
                await asyncio.sleep(period)

    async def stop(self) -> None:
        if self._beat is not None:
            self._beat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._beat
        await self.server.stop(None)


@dataclass
class NullCluster:
    router: RouterServer
    workers: list[NullWorker]

    @property
    def address(self) -> str:
        return self.router.address

    async def stop(self) -> None:
        for w in self.workers:
            await w.stop()
        await self.router.stop(0)


async def start_null_cluster(tokens_per_message: int = 1, max_inflight: int = 4096,
                             context_len: int = 1 << 16, heartbeat_seconds: float = 0.2,
                             timeout: float = 10.0) -> NullCluster:
    """Router on 127.0.0.1:0 (no tokenizer: token ids only, empty text) + one null replica per pool."""
    config = RouterConfig(vocab_size=VOCAB, context_len=context_len, block_size=BLOCK_SIZE, port=0,
                          max_inflight=max_inflight, max_queued_prompt_tokens=1 << 30,
                          heartbeat_seconds=heartbeat_seconds)
    router = RouterServer(config, None)
    await router.start()
    cluster = NullCluster(router, [NullWorker("null-prefill", NullPrefill()),
                                   NullWorker("null-decode", NullDecode(tokens_per_message))])
    for w in cluster.workers:
        await w.start(router.internal_address, heartbeat_seconds)
    deadline = asyncio.get_running_loop().time() + timeout
    while not router.registry.serving():
        if asyncio.get_running_loop().time() > deadline:
            await cluster.stop()
            raise TimeoutError("null workers never registered")
        await asyncio.sleep(0.02)
    return cluster
