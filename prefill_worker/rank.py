"""A non-zero rank of a prefill TP group: a Ray actor placed in its replica's placement group.

Lifecycle: `start()` joins the group's torch.distributed rendezvous, builds this rank's model slice
and KV cache, starts the rank's KV source and returns its endpoint; a thread then runs the follower
loop (rank 0's steps, until rank 0 stops the group). Rank 0 forwards leases as protobuf bytes
(`lease()` / `unlease()`) so this rank serves pulls of exactly the leased blocks.
"""

from __future__ import annotations

import asyncio
import threading

import torch
from pdserve.v1 import kv_pb2

from engine.config import DTYPES
from engine.cpus import pin_process
from engine.distributed import Follower, GroupSpec, init_group
from kv_transfer import make_source, serve_on_running_loop
from kv_transfer.host import HOST_ID
from kv_transfer.source import KVSource
from prefill_worker.config import PrefillWorkerConfig


def encode_lease(request_id: str, block_ids: list[int], expiry: float, token: bytes) -> bytes:
    shard = kv_pb2.KVHandle(request_id=request_id, lease_expiry=expiry, lease_token=token)
    shard.shards.add(block_ids=block_ids)
    return shard.SerializeToString()


def encode_stream_lease(request_id: str, block_ids: list[int], ready_blocks: int, expiry: float,
                        token: bytes) -> bytes:
    """A streamed lease for a follower rank (num_tokens carries the ready block count)."""
    shard = kv_pb2.KVHandle(request_id=request_id, lease_expiry=expiry, num_tokens=ready_blocks,
                            lease_token=token)
    shard.shards.add(block_ids=block_ids)
    return shard.SerializeToString()


class PrefillRank:
    """Ray actor body (wrapped with ray.remote by the replica)."""

    def __init__(self, cfg: PrefillWorkerConfig, rank: int, spec: GroupSpec) -> None:
        pin_process(cfg.cpu_affinity)
        torch.set_num_threads(cfg.torch_threads)
        self.cfg, self.rank, self.spec = cfg, rank, spec
        self.source: KVSource | None = None
        self.thread: threading.Thread | None = None

    async def start(self) -> tuple[str, str]:
        """-> (this rank's KV source endpoint, its host id)."""
        serve_on_running_loop(self.cfg.kv_backend)
        follower = await asyncio.to_thread(self._build)
        self.source = make_source(
            self.cfg.kv_backend, follower.kv, self.rank, self.spec.world_size,
            follower.model.config.num_kv_heads,
        )
        endpoint = await self.source.start(self.cfg.host)
        self.thread = threading.Thread(target=follower.run, name=f"tp-rank{self.rank}", daemon=True)
        self.thread.start()
        return endpoint, HOST_ID

    def _build(self) -> Follower:
        engine = self.cfg.engine
        tp = init_group(self.spec, self.rank, engine.device)
        return Follower(engine.model, DTYPES[engine.dtype], tp, self.spec.cache, device=engine.device)

    def lease(self, lease: bytes) -> None:
        msg = kv_pb2.KVHandle.FromString(lease)
        assert self.source is not None
        self.source.lease(msg.request_id, list(msg.shards[0].block_ids), msg.lease_expiry, msg.lease_token)

    def stream_lease(self, lease: bytes) -> None:
        msg = kv_pb2.KVHandle.FromString(lease)
        assert self.source is not None
        self.source.stream_lease(msg.request_id, list(msg.shards[0].block_ids), msg.num_tokens, msg.lease_expiry,
                                 token=msg.lease_token)

    def unlease(self, request_id: str) -> None:
        assert self.source is not None
        self.source.unlease(request_id)

    def alive(self) -> bool:
        return self.thread is not None and self.thread.is_alive()

    async def stop(self) -> None:
        if self.source is not None:
            await self.source.close()
