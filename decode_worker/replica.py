"""One decode replica: a TP group of `tensor_parallel_size` processes, rank 0 in this one, each
with its (optionally quantized) model slice, KV cache and KV puller; the DecodeWorker service.

Lifecycle:
  1. `start()`: with TP > 1, start ranks 1..N-1 as Ray actors (decode_worker/rank.py) in this
     replica's placement group bundles 1..N-1; every rank joins a gloo (CPU) / NCCL (GPU) group
     through rank 0's rendezvous. Rank 0 builds the engine (scheduler, its model slice, quantized
     layer by layer while loading) and drives the others with the engine's step broadcast.
  2. Requests flow through `DecodeService` (decode_worker/server.py). A request's KV is pulled by
     every rank at once, each its own KV heads from the prefill ranks that hold them, into the
     blocks rank 0 reserved (the same block ids on every rank).
  3. `status()` feeds the heartbeat; `stop()` stops the service, the TP group, the engine thread and
     the pullers.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

import grpc
import torch
from pdserve.v1 import worker_pb2, worker_pb2_grpc

from decode_worker.config import DecodeWorkerConfig
from decode_worker.rank import DecodeRank, RankPulls
from decode_worker.server import SERVER_OPTIONS, DecodeService
from engine.async_engine import AsyncEngine
from engine.config import load_config
from engine.cpus import pin_process
from engine.distributed import GroupSpec, free_port, init_group
from engine.engine import LLMEngine, resolve_cache_config
from kv_transfer import make_puller
from kv_transfer.handle import KVHandle
from kv_transfer.puller import KVPuller

PULL_LATENCY_BOUNDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


@dataclass(slots=True)
class PullStats:
    """KV pulls done by this replica (cumulative), reported in every heartbeat for Prometheus."""

    pulls: int = 0
    bytes: int = 0
    seconds: float = 0.0
    counts: list[int] = field(default_factory=lambda: [0] * (len(PULL_LATENCY_BOUNDS) + 1))

    def observe(self, seconds: float, nbytes: int) -> None:
        self.pulls += 1
        self.bytes += nbytes
        self.seconds += seconds
        self.counts[next((i for i, b in enumerate(PULL_LATENCY_BOUNDS) if seconds <= b), -1)] += 1

    def fill(self, st: worker_pb2.WorkerStatus) -> None:
        st.kv_pulls, st.kv_pull_bytes, st.kv_pull_seconds = self.pulls, self.bytes, self.seconds
        st.kv_pull_latency_bounds.extend(PULL_LATENCY_BOUNDS)
        st.kv_pull_latency_counts.extend(self.counts)


class DecodeReplica:
    def __init__(self, cfg: DecodeWorkerConfig) -> None:
        pin_process(cfg.cpu_affinity)
        torch.set_num_threads(cfg.torch_threads)
        self.cfg = cfg
        self.engine: AsyncEngine | None = None
        self.puller: KVPuller | None = None
        self.server: grpc.aio.Server | None = None
        self.channels: dict[str, grpc.aio.Channel] = {}
        self.service: DecodeService | None = None
        self.pulls = PullStats()
        self.address = ""
        self.ranks = RankPulls([])

    async def start(self) -> str:
        world = self.cfg.tensor_parallel_size
        cache = resolve_cache_config(self.cfg.engine, load_config(self.cfg.engine.model), world)
        spec = GroupSpec(f"tcp://{self.cfg.host}:{free_port(self.cfg.host)}", world, cache)
        followers = [self._spawn(rank, spec) for rank in range(1, world)]
        self.ranks = RankPulls(followers)
        follower_starts = [f.start.remote() for f in followers]
        llm = await asyncio.to_thread(self._build_engine, spec)
        await asyncio.gather(*follower_starts)
        self.engine = AsyncEngine(llm, asyncio.get_running_loop())
        self.puller = make_puller(self.cfg.kv_backend, llm.kv, 0, world, llm.model_config.num_kv_heads,
                                  same_host_read=self.cfg.kv_same_host_read)
        self.service = service = DecodeService(
            self.engine, self._pull, self._release, self.cfg.transfer_timeout_seconds,
            self.cfg.admission_wait_seconds,
        )
        service.pull_chunk = self._pull_chunk
        self.server = grpc.aio.server(options=SERVER_OPTIONS)
        worker_pb2_grpc.add_DecodeWorkerServicer_to_server(service, self.server)
        port = self.server.add_insecure_port(f"{self.cfg.host}:0")
        await self.server.start()
        self.address = f"{self.cfg.host}:{port}"
        return self.address

    def _build_engine(self, spec: GroupSpec) -> LLMEngine:
        tp = init_group(spec, 0, self.cfg.engine.device) if spec.world_size > 1 else None
        return LLMEngine(self.cfg.engine, tp, spec.cache)

    def _spawn(self, rank: int, spec: GroupSpec) -> Any:
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        pg = ray.util.get_current_placement_group()
        options: dict[str, Any] = {"num_cpus": self.cfg.rank_num_cpus, "num_gpus": self.cfg.rank_num_gpus}
        if pg is not None:
            options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=rank)
        return ray.remote(DecodeRank).options(**options).remote(self.cfg, rank, spec)

    @property
    def followers(self) -> list[Any]:
        """The Ray actors of ranks 1..N-1."""
        return self.ranks.followers

    def _block_bytes(self) -> int:
        """One block on every rank: all layers, K and V, each rank's heads."""
        assert self.engine is not None
        return self.engine.kv[0].nbytes * self.cfg.tensor_parallel_size

    async def _pull(self, handle: KVHandle, blocks: list[int], timeout: float) -> None:
        assert self.puller is not None
        start = time.perf_counter()
        await self.ranks.run(self.puller.pull(handle, blocks, timeout), handle, blocks, timeout, -1)
        self.pulls.observe(time.perf_counter() - start, len(blocks) * self._block_bytes())

    async def _pull_chunk(self, handle: KVHandle, first_block: int, blocks: list[int], timeout: float) -> int | None:
        """One chunk of a streamed handle (its latency includes waiting for prefill to compute it)."""
        assert self.puller is not None
        start = time.perf_counter()
        own = self.puller.pull_chunk(handle, first_block, blocks, timeout)
        first = await self.ranks.run(own, handle, blocks, timeout, first_block)
        self.pulls.observe(time.perf_counter() - start, len(blocks) * self._block_bytes())
        return first

    async def _release(self, prefill_address: str, request_id: str) -> None:
        """Tells the prefill replica to free its lease; failures only shorten nothing (the lease expires)."""
        if not prefill_address:
            return
        channel = self.channels.get(prefill_address)
        if channel is None:
            channel = self.channels[prefill_address] = grpc.aio.insecure_channel(prefill_address)
        try:
            stub = worker_pb2_grpc.PrefillWorkerStub(channel)
            await stub.ReleaseKV(worker_pb2.ReleaseKVRequest(request_id=request_id), timeout=5.0)
        except grpc.aio.AioRpcError:
            pass

    def status(self, replica_id: str) -> worker_pb2.WorkerStatus:
        ready = self.engine is not None and self.engine.error is None and self.address != ""
        st = worker_pb2.WorkerStatus(
            replica_id=replica_id, role=worker_pb2.WorkerStatus.DECODE, address=self.address, ready=ready,
            tp_size=self.cfg.tensor_parallel_size, block_size=self.cfg.engine.block_size, kv_dtype=self.cfg.engine.dtype,
            quantization=self.cfg.engine.quantization,
        )
        if self.engine is not None:
            engine = self.engine
            st.running, st.queued = engine.num_running, engine.num_waiting
            st.kv_blocks_total, st.kv_blocks_free = engine.num_total_blocks, engine.num_free_blocks
            st.weight_bytes = engine.weight_bytes()
        self.pulls.fill(st)
        return st

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.stop(grace=1.0)
        if self.engine is not None:
            if self.engine.error is None:
                await self.engine.shutdown()  # stops the follower ranks
            self.engine.close()
        if self.puller is not None:
            await self.puller.close()
        await self.ranks.stop()
        for channel in self.channels.values():
            await channel.close()

