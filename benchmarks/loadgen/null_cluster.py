"""A real router with model-free workers: the data plane alone (benchmarks, bench tests).

    cluster = await start_null_cluster(tokens_per_message=1)   # cluster.address -> "127.0.0.1:PORT"
    ...; await cluster.stop()

NullPrefill answers Prefill at once (first token, an empty KV handle, nothing leased). The decode
side is one of
  "engine": the real DecodeService driven by a NullEngine (null_engine.py): tokens leave in
            per-step messages, merged when they pile up, as with a real model;
  an int k: NullDecode streams max_tokens - 1 tokens as fast as gRPC takes them, k per message
            (1 = one message per token, the worst case for the data plane).
Both are plain grpc.aio servers on 127.0.0.1:0 that heartbeat a WorkerStatus into the router's
Registry, like the real replicas; the router (validation, admission, picking, streaming) is real.

`python -m benchmarks.loadgen.null_cluster --role router|workers|both` runs one part in its own
process (benchmarks put the client, the router and the workers in separate processes) and prints
`ROUTER host:port REGISTRY host:port` (plus `HTTP host:port` with `--http-port`) once serving; it
stops when stdin closes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field

import grpc
from pdserve.v1 import kv_pb2, worker_pb2, worker_pb2_grpc

from benchmarks.loadgen.null_engine import add_null_engine_decode
from engine.async_engine import AsyncEngine
from engine.config import BLOCK_SIZE
from router.config import RouterConfig
from router.server import RouterServer

VOCAB = 32000
HEARTBEAT_S = 0.2  # in one process: beat often, so a started cluster is ready soon
# Separate processes under full load: a worker's loop can be busy for a while, and a replica silent
# for 3 heartbeats is forgotten (requests then fail UNAVAILABLE), so beat less eagerly than tests do.
PROCESS_HEARTBEAT_S = 1.0


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


DecodeMode = int | str  # tokens per message, or "engine"


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
    prefill: bool
    decode: DecodeMode = 1
    server: grpc.aio.Server = field(default_factory=grpc.aio.server)
    address: str = ""
    _beat: asyncio.Task[None] | None = None
    _engine: AsyncEngine | None = None

    def status(self) -> worker_pb2.WorkerStatus:
        role = worker_pb2.WorkerStatus.PREFILL if self.prefill else worker_pb2.WorkerStatus.DECODE
        return worker_pb2.WorkerStatus(
            replica_id=self.replica_id, role=role, address=self.address, ready=True, tp_size=1,
            kv_blocks_total=1 << 20, kv_blocks_free=1 << 20, block_size=BLOCK_SIZE,
            kv_dtype="float32", quantization="none", model_fingerprint="null")

    async def start(self, registry_address: str, heartbeat_seconds: float) -> None:
        if self.prefill:
            worker_pb2_grpc.add_PrefillWorkerServicer_to_server(NullPrefill(), self.server)
        elif self.decode == "engine":
            self._engine = add_null_engine_decode(self.server)
        else:
            worker_pb2_grpc.add_DecodeWorkerServicer_to_server(NullDecode(int(self.decode)), self.server)
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
        if self._engine is not None:
            self._engine.close()


@dataclass
class NullCluster:
    router: RouterServer | None
    workers: list[NullWorker]
    address: str = ""

    async def stop(self) -> None:
        for w in self.workers:
            await w.stop()
        if self.router is not None:
            await self.router.stop(0)


async def start_null_router(max_inflight: int = 4096, context_len: int = 1 << 16,
                            heartbeat_seconds: float = HEARTBEAT_S, http_port: int | None = None) -> RouterServer:
    """The real router on 127.0.0.1:0, no tokenizer (token ids in and out, empty text); with
    `http_port` (0 = a free one) also its OpenAI HTTP door."""
    config = RouterConfig(vocab_size=VOCAB, context_len=context_len, block_size=BLOCK_SIZE, port=0,
                          max_inflight=max_inflight, max_queued_prompt_tokens=1 << 30,
                          heartbeat_seconds=heartbeat_seconds, http_port=http_port, model_name="null")
    router = RouterServer(config, None)
    await router.start()
    return router


async def start_null_workers(registry_address: str, decode: DecodeMode = 1,
                             heartbeat_seconds: float = HEARTBEAT_S) -> list[NullWorker]:
    workers = [NullWorker("null-prefill", prefill=True), NullWorker("null-decode", False, decode)]
    for w in workers:
        await w.start(registry_address, heartbeat_seconds)
    return workers


async def wait_serving(router: RouterServer, timeout: float) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not router.registry.serving():
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError("null workers never registered")
        await asyncio.sleep(0.02)


async def start_null_cluster(decode: DecodeMode = 1, max_inflight: int = 4096,
                             heartbeat_seconds: float = HEARTBEAT_S, timeout: float = 10.0) -> NullCluster:
    """Router + one null replica per pool, all on this event loop."""
    router = await start_null_router(max_inflight, heartbeat_seconds=heartbeat_seconds)
    cluster = NullCluster(router, [], router.address)
    try:
        cluster.workers = await start_null_workers(router.internal_address, decode, heartbeat_seconds)
        await wait_serving(router, timeout)
    except BaseException:
        await cluster.stop()
        raise
    return cluster


async def _serve(role: str, registry: str, decode: DecodeMode, heartbeat: float,
                 http_port: int | None = None) -> None:
    router = await start_null_router(heartbeat_seconds=heartbeat, http_port=http_port) \
        if role in ("router", "both") else None
    workers = []
    if role in ("workers", "both"):
        workers = await start_null_workers(router.internal_address if router else registry, decode, heartbeat)
    if router is not None:
        if workers:
            await wait_serving(router, 30.0)
        http = f" HTTP {router.http_address}" if router.http is not None else ""
        print(f"ROUTER {router.address} REGISTRY {router.internal_address}{http}", flush=True)
    else:
        print("WORKERS up", flush=True)
    await asyncio.to_thread(sys.stdin.read)  # until the parent closes our stdin
    await NullCluster(router, workers).stop()


def main() -> None:
    p = argparse.ArgumentParser(description="a null-model pdserve part, in its own process")
    p.add_argument("--role", choices=("router", "workers", "both"), default="both")
    p.add_argument("--registry", default="", help="workers: the router's registry host:port")
    p.add_argument("--decode", default="1", help='"engine" or tokens per message')
    p.add_argument("--heartbeat", type=float, default=PROCESS_HEARTBEAT_S)
    p.add_argument("--http-port", type=int, default=None, help="router: also serve OpenAI HTTP (0 = free port)")
    args = p.parse_args()
    logging.basicConfig(level=logging.ERROR)
    decode: DecodeMode = args.decode if args.decode == "engine" else int(args.decode)
    asyncio.run(_serve(args.role, args.registry, decode, args.heartbeat, args.http_port))


if __name__ == "__main__":
    main()


@contextlib.contextmanager
def null_processes(decode: DecodeMode = 1, timeout: float = 60.0) -> Iterator[str]:
    """The null router and the null workers, each in its own Python process; yields the router's
    address once it is SERVING. Both stop when the block exits."""
    with null_processes_http(decode, timeout, http=False) as (address, _):
        yield address


@contextlib.contextmanager
def null_processes_http(decode: DecodeMode = 1, timeout: float = 60.0,
                        http: bool = True) -> Iterator[tuple[str, str]]:
    """null_processes, the router also serving OpenAI HTTP: yields (gRPC address, HTTP address)."""
    from router.client import wait_healthy

    cmd = [sys.executable, "-m", "benchmarks.loadgen.null_cluster"]
    env = {**os.environ, "GRPC_VERBOSITY": "ERROR"}
    extra = ["--http-port", "0"] if http else []
    router = subprocess.Popen([*cmd, "--role", "router", *extra], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env=env)
    procs = [router]
    try:
        words = (router.stdout.readline() if router.stdout else "").split()
        if len(words) != (6 if http else 4):
            raise RuntimeError(f"null router did not start: {words}")
        workers = subprocess.Popen([*cmd, "--role", "workers", "--registry", words[3], "--decode", str(decode)],
                                   stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)
        procs.append(workers)
        wait_healthy(words[1], timeout)
        yield words[1], words[5] if http else ""
    finally:
        for p in reversed(procs):
            if p.stdin:
                p.stdin.close()
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
