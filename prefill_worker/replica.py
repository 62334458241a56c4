"""One prefill replica: a TP group of `tensor_parallel_size` processes, rank 0 in this one.

Lifecycle:
  1. `start()`: with TP > 1, start ranks 1..N-1 as Ray actors in this replica's placement group
     bundles 1..N-1; every rank joins a gloo (CPU) / NCCL (GPU) group through rank 0's rendezvous.
  2. Rank 0 builds the engine (scheduler + its model slice); each rank starts a KV source over its own
     cache slice. The gRPC PrefillWorker service starts on `cfg.host` (ephemeral port).
  3. Requests flow through `PrefillService` (prefill_worker/server.py).
  4. `status()` feeds the heartbeat; `stop()` stops the service, the followers and the KV sources.
"""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import torch
from pdserve.v1 import worker_pb2, worker_pb2_grpc

from engine.async_engine import AsyncEngine
from engine.config import DTYPES, load_config
from engine.cpus import pin_process
from engine.distributed import GroupSpec, free_port, init_group
from engine.engine import LLMEngine, resolve_cache_config
from kv_transfer import make_source
from kv_transfer.host import HOST_ID
from kv_transfer.source import KVSource
from prefill_worker.config import PrefillWorkerConfig
from prefill_worker.lease import RankLease
from prefill_worker.rank import PrefillRank, encode_lease, encode_stream_lease
from prefill_worker.server import SERVER_OPTIONS, PrefillService


class PrefillReplica:
    def __init__(self, cfg: PrefillWorkerConfig) -> None:
        pin_process(cfg.cpu_affinity)
        torch.set_num_threads(cfg.torch_threads)
        self.cfg = cfg
        self.cache = resolve_cache_config(cfg.engine, load_config(cfg.engine.model), cfg.tensor_parallel_size)
        self.followers: list[Any] = []
        self.sources: list[KVSource] = []
        self.server: grpc.aio.Server | None = None
        self.engine: AsyncEngine | None = None
        self.service: PrefillService | None = None
        self.address = ""

    async def start(self) -> str:
        """Builds the TP group and starts serving; returns the gRPC address."""
        spec = GroupSpec(f"tcp://{self.cfg.host}:{free_port(self.cfg.host)}", self.cfg.tensor_parallel_size, self.cache)
        self.followers = [self._spawn(rank, spec) for rank in range(1, spec.world_size)]
        follower_starts = [f.start.remote() for f in self.followers]
        llm = await asyncio.to_thread(self._build_engine, spec)
        self.engine = engine = AsyncEngine(llm, asyncio.get_running_loop())
        source = make_source(self.cfg.kv_backend, engine.kv, 0, spec.world_size, engine.model_config.num_kv_heads)
        self.sources.append(source)
        ranks = [_local_lease(source, await source.start(self.cfg.host))]
        for rank, (actor, (endpoint, host)) in enumerate(
            zip(self.followers, await asyncio.gather(*follower_starts), strict=True), 1
        ):
            ranks.append(_remote_lease(actor, rank, endpoint, host))
        self.service = PrefillService(self.engine, ranks, self.cfg.lease_seconds, self.cfg.engine.dtype)
        self.service.stream_chunk_blocks = -(-self.cfg.engine.max_num_batched_tokens // self.cache.block_size)
        self.server = grpc.aio.server(options=SERVER_OPTIONS)
        worker_pb2_grpc.add_PrefillWorkerServicer_to_server(self.service, self.server)
        port = self.server.add_insecure_port(f"{self.cfg.host}:0")
        await self.server.start()
        self.address = f"{self.cfg.host}:{port}"
        return self.address

    def _build_engine(self, spec: GroupSpec) -> LLMEngine:
        tp = init_group(spec, 0, self.cfg.engine.device) if spec.world_size > 1 else None
        return LLMEngine(self.cfg.engine, tp, self.cache)

    def _spawn(self, rank: int, spec: GroupSpec) -> Any:
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        pg = ray.util.get_current_placement_group()
        options: dict[str, Any] = {"num_cpus": self.cfg.rank_num_cpus, "num_gpus": self.cfg.rank_num_gpus}
        if pg is not None:
            options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=rank)
        return ray.remote(PrefillRank).options(**options).remote(self.cfg, rank, spec)

    def status(self, replica_id: str) -> worker_pb2.WorkerStatus:
        ready = self.engine is not None and self.engine.error is None and self.address != ""
        st = worker_pb2.WorkerStatus(
            replica_id=replica_id, role=worker_pb2.WorkerStatus.PREFILL, address=self.address, ready=ready,
            tp_size=self.cfg.tensor_parallel_size, block_size=self.cache.block_size, kv_dtype=self.cfg.engine.dtype,
            quantization="none",
        )
        engine = self.engine
        if engine is not None and self.service is not None:
            st.running, st.queued = engine.num_running, engine.num_waiting
            st.queued_prompt_tokens = self.service.queued_prompt_tokens
            st.kv_blocks_total, st.kv_blocks_free = engine.num_total_blocks, engine.num_free_blocks
            st.kv_blocks_leased = self.service.leased_blocks()
            st.weight_bytes = engine.weight_bytes()
        return st

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.stop(grace=1.0)
        if self.engine is not None:
            await self.engine.shutdown()
            self.engine.close()
        for source in self.sources:
            await source.close()
        for actor in self.followers:
            try:
                await actor.stop.remote()
            except Exception:  # noqa: BLE001 - best effort on the way down
                pass


def _local_lease(source: KVSource, endpoint: str) -> RankLease:
    async def lease(rid: str, blocks: list[int], expiry: float, token: bytes) -> None:
        source.lease(rid, blocks, expiry, token)

    async def unlease(rid: str) -> None:
        source.unlease(rid)

    async def stream_lease(rid: str, blocks: list[int], ready: int, expiry: float, first: int | None,
                           token: bytes) -> None:
        source.stream_lease(rid, blocks, ready, expiry, first, token)

    return RankLease(0, endpoint, lease, unlease, stream_lease, HOST_ID)


def _remote_lease(actor: Any, rank: int, endpoint: str, host_id: str) -> RankLease:
    async def lease(rid: str, blocks: list[int], expiry: float, token: bytes) -> None:
        await actor.lease.remote(encode_lease(rid, blocks, expiry, token))

    async def unlease(rid: str) -> None:
        await actor.unlease.remote(rid)

    async def stream_lease(rid: str, blocks: list[int], ready: int, expiry: float, first: int | None,
                           token: bytes) -> None:
        await actor.stream_lease.remote(encode_stream_lease(rid, blocks, ready, expiry, token))

    return RankLease(rank, endpoint, lease, unlease, stream_lease, host_id)


__all__ = ["PrefillReplica", "DTYPES"]
