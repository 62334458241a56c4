"""The load generator: one grpc.aio channel (or one HTTP session for `--endpoint openai`,
openai_client.py), one task per request, every streamed message timed.

    results = await run_bench(cfg)   # one RunResult per load, warm-up first (not recorded)

The client measures its own overhead: CPU seconds of this process over the run, how late each
request left compared with its Poisson schedule (dispatch lag), and how late a 10 ms ticker wakes
(event-loop lag). A client near one CPU second per wall second, or with lags near the latencies it
reports, is the bottleneck, not the server.
"""

from __future__ import annotations

import asyncio
import math
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import grpc
from pdserve.v1 import router_pb2, router_pb2_grpc

from benchmarks.loadgen.arrivals import arrival_offsets
from benchmarks.loadgen.config import BenchConfig, Load
from benchmarks.loadgen.dataset import RequestSpec, make_requests
from benchmarks.loadgen.stats import RequestRecord, RunStats, distribution, summarize
from router.client import build_request

Metadata = tuple[tuple[str, str], ...] | None
TICK_S = 0.01


@dataclass(frozen=True, slots=True)
class ClientOverhead:
    cpu_s: float
    wall_s: float
    dispatch_lag_ms: dict[str, float]  # sent - scheduled, before waiting for a concurrency slot
    loop_lag_ms: dict[str, float]      # how late a 10 ms ticker woke up

    @property
    def cpu_utilization(self) -> float:
        return self.cpu_s / self.wall_s if self.wall_s > 0 else math.nan


@dataclass(frozen=True, slots=True)
class RunResult:
    load: Load
    stats: RunStats
    records: list[RequestRecord]
    overhead: ClientOverhead


class _Progress:
    """One stderr line, redrawn at most every 0.25 s."""

    def __init__(self, label: str, total: int, enabled: bool) -> None:
        self.label, self.total, self.enabled = label, total, enabled
        self.done = self.failed = 0
        self._start = time.perf_counter()
        self._drawn = 0.0

    def update(self, ok: bool, force: bool = False) -> None:
        self.done += 1
        self.failed += not ok
        now = time.perf_counter()
        if self.enabled and (force or self.done == self.total or now - self._drawn > 0.25):
            self._drawn = now
            width = 30
            bar = "#" * (width * self.done // self.total)
            rate = self.done / max(now - self._start, 1e-9)
            sys.stderr.write(f"\r[bench] {self.label:<28} [{bar:<{width}}] {self.done}/{self.total} "
                             f"errors {self.failed}  {rate:.1f} req/s")
            if self.done == self.total:
                sys.stderr.write("\n")
            sys.stderr.flush()


async def _ticker(lags: list[float], stop: asyncio.Event) -> None:
    while not stop.is_set():
        t = time.perf_counter()
        await asyncio.sleep(TICK_S)
        lags.append(max(0.0, time.perf_counter() - t - TICK_S))


Send = Callable[[RequestSpec, RequestRecord, float], Awaitable[None]]  # (spec, record, t0)


def grpc_sender(stub: router_pb2_grpc.RouterStub, timeout: float, metadata: Metadata) -> Send:
    """Streams one request through Router.Generate, timing each message with tokens."""

    async def send(spec: RequestSpec, rec: RequestRecord, t0: float) -> None:
        request = build_request(spec.prompt_ids, max_tokens=spec.max_tokens, ignore_eos=True)
        rec.sent = time.perf_counter() - t0
        finished = False
        try:
            async for msg in stub.Generate(request, timeout=timeout, metadata=metadata):
                if msg.token_ids:
                    rec.message_times.append(time.perf_counter() - t0)
                    rec.output_tokens += len(msg.token_ids)
                if msg.finish_reason != router_pb2.FINISH_REASON_UNSPECIFIED:
                    finished = True
                    rec.output_tokens = msg.usage.completion_tokens or rec.output_tokens
            if not finished:
                rec.error = "NO_FINISH_REASON"
        except grpc.aio.AioRpcError as e:
            rec.error = e.code().name
        rec.done = time.perf_counter() - t0

    return send


async def run_load(send: Send, specs: Sequence[RequestSpec], load: Load, offsets: Sequence[float],
                   progress: _Progress | None = None) -> tuple[list[RequestRecord], float, ClientOverhead]:
    """Sends specs[i] at offsets[i] (at most load.concurrency in flight); returns the records,
    the run's duration (first send -> last finish) and the client's overhead."""
    records = [RequestRecord(len(s.prompt_ids), s.max_tokens, scheduled=o, kind=s.kind)
               for s, o in zip(specs, offsets, strict=True)]
    slots = asyncio.Semaphore(load.concurrency) if load.concurrency else None
    dispatch_lags: list[float] = []
    loop_lags: list[float] = []
    stop = asyncio.Event()
    ticker = asyncio.get_running_loop().create_task(_ticker(loop_lags, stop))
    cpu0, t0 = time.process_time(), time.perf_counter()

    async def one(spec: RequestSpec, rec: RequestRecord) -> None:
        if slots is None:
            await send(spec, rec, t0)
        else:
            async with slots:
                await send(spec, rec, t0)
        if progress is not None:
            progress.update(rec.ok)

    tasks = []
    loop = asyncio.get_running_loop()
    for spec, rec in zip(specs, records, strict=True):  # arrivals in order, one timer at a time
        delay = rec.scheduled - (time.perf_counter() - t0)
        if delay > 0:
            await asyncio.sleep(delay)
        dispatch_lags.append(max(0.0, time.perf_counter() - t0 - rec.scheduled))
        tasks.append(loop.create_task(one(spec, rec)))
    await asyncio.gather(*tasks)
    wall = time.perf_counter() - t0
    cpu = time.process_time() - cpu0
    stop.set()
    await ticker
    duration = max(r.done for r in records) - min(r.sent for r in records)
    overhead = ClientOverhead(cpu, wall, distribution(dispatch_lags), distribution(loop_lags))
    return records, duration, overhead


def _channel(cfg: BenchConfig) -> grpc.aio.Channel:
    options = (("grpc.max_receive_message_length", 64 << 20),)
    if cfg.root_ca is None:
        return grpc.aio.insecure_channel(cfg.address, options=options)
    with open(cfg.root_ca, "rb") as f:
        creds = grpc.ssl_channel_credentials(root_certificates=f.read())
    return grpc.aio.secure_channel(cfg.address, creds, options=options)


async def run_bench(cfg: BenchConfig) -> list[RunResult]:
    """Warm-up (not recorded), then each load in turn with fresh prompts of the same length mix,
    through the gRPC API (`cfg.endpoint` "grpc") or the OpenAI HTTP API ("openai")."""
    if cfg.endpoint == "openai":
        from benchmarks.loadgen.openai_client import openai_sender

        async with openai_sender(cfg) as send:
            return await _run_loads(cfg, send)
    metadata: Metadata = (("authorization", f"Bearer {cfg.api_key}"),) if cfg.api_key else None
    async with _channel(cfg) as channel:
        await asyncio.wait_for(channel.channel_ready(), 30)
        return await _run_loads(cfg, grpc_sender(router_pb2_grpc.RouterStub(channel), cfg.timeout_s, metadata))


async def _run_loads(cfg: BenchConfig, send: Send) -> list[RunResult]:
    if cfg.warmup:
        warm = make_requests(cfg.dataset, cfg.warmup, seed_offset=0)
        cap = Load(concurrency=cfg.loads[0].concurrency or min(cfg.warmup, 8))
        await run_load(send, warm, cap, [0.0] * len(warm), _Progress("warm-up", len(warm), cfg.progress))
    results = []
    for i, load in enumerate(cfg.loads):
        specs = make_requests(cfg.dataset, cfg.num_requests, seed_offset=i + 1)
        offsets = arrival_offsets(len(specs), load.rate, seed=cfg.seed + i)
        bar = _Progress(load.label, len(specs), cfg.progress)
        records, duration, overhead = await run_load(send, specs, load, offsets, bar)
        results.append(RunResult(load, summarize(records, duration, cfg.slo), records, overhead))
    return results
