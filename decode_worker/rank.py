"""A non-zero rank of a decode TP group: a Ray actor placed in its replica's placement group.

Lifecycle: `start()` joins the group's torch.distributed rendezvous, builds this rank's (quantized)
model slice and KV cache and a KV puller over it; a thread then runs the follower loop (rank 0's
steps, until rank 0 stops the group). For every request rank 0 asks each rank to `pull()` its own
share of the KV heads into the blocks rank 0 reserved (the same block ids on every rank); a pull
that rank 0 gives up on is cancelled here, and returns only once nothing writes into those blocks.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Sequence
from typing import Any, TypeVar

import torch
from pdserve.v1 import kv_pb2

from decode_worker.config import DecodeWorkerConfig
from engine.config import DTYPES
from engine.cpus import pin_process
from engine.distributed import Follower, GroupSpec, init_group
from kv_transfer import make_puller, serve_on_running_loop
from kv_transfer.handle import KVHandle
from kv_transfer.interfaces import TransferError
from kv_transfer.puller import KVPuller

T = TypeVar("T")


class DecodeRank:
    """Ray actor body (wrapped with ray.remote by the replica)."""

    def __init__(self, cfg: DecodeWorkerConfig, rank: int, spec: GroupSpec) -> None:
        pin_process(cfg.cpu_affinity)
        torch.set_num_threads(cfg.torch_threads)
        self.cfg, self.rank, self.spec = cfg, rank, spec
        self.puller: KVPuller | None = None
        self.thread: threading.Thread | None = None

    async def start(self) -> None:
        serve_on_running_loop(self.cfg.kv_backend)
        follower = await asyncio.to_thread(self._build)
        self.puller = make_puller(self.cfg.kv_backend, follower.kv, self.rank, self.spec.world_size,
                                  follower.model.config.num_kv_heads, same_host_read=self.cfg.kv_same_host_read)
        self.thread = threading.Thread(target=follower.run, name=f"tp-rank{self.rank}", daemon=True)
        self.thread.start()

    def _build(self) -> Follower:
        engine = self.cfg.engine
        tp = init_group(self.spec, self.rank, engine.device)
        return Follower(engine.model, DTYPES[engine.dtype], tp, self.spec.cache,
                        device=engine.device, quantization=engine.quantization)

    async def pull(self, handle: bytes, blocks: list[int], timeout: float, first_block: int) -> None:
        """This rank's heads of a request's KV into kv[blocks]; first_block >= 0: a chunk of a
        streamed handle (blocks [first_block, first_block + len(blocks)) of the request)."""
        assert self.puller is not None
        kv = KVHandle.from_proto(kv_pb2.KVHandle.FromString(handle))
        try:
            if first_block >= 0:
                await self.puller.pull_chunk(kv, first_block, blocks, timeout)
            else:
                await self.puller.pull(kv, blocks, timeout)
        finally:
            self.puller.forget(kv.request_id)

    def alive(self) -> bool:
        return self.thread is not None and self.thread.is_alive()

    async def stop(self) -> None:
        if self.puller is not None:
            await self.puller.close()


class RankPulls:
    """Rank 0's side of the follower ranks' pulls: `run()` pulls on every rank at once (rank 0's own
    pull and one actor call per follower). The first failure, or a cancellation, cancels the
    others and waits until none of them writes into the blocks any more, so the caller may free
    them as soon as run() ends."""

    def __init__(self, followers: list[Any]) -> None:
        self.followers = followers

    async def run(self, own: Awaitable[T], handle: KVHandle, blocks: list[int], timeout: float,
                  first_block: int) -> T:
        """Returns rank 0's result; raises TransferError if any rank's pull failed."""
        if not self.followers:
            return await own
        data = handle.to_proto().SerializeToString()
        refs = [f.pull.remote(data, blocks, timeout, first_block) for f in self.followers]
        mine = asyncio.ensure_future(own)
        theirs = [asyncio.ensure_future(_follower_pull(rank, ref)) for rank, ref in enumerate(refs, 1)]
        try:
            await asyncio.gather(mine, *theirs)
        except BaseException:
            await asyncio.shield(_settle(mine, refs, theirs, timeout))
            raise
        return mine.result()

    async def stop(self) -> None:
        for actor in self.followers:
            try:
                await actor.stop.remote()
            except Exception:  # noqa: BLE001 - best effort on the way down
                pass


async def _follower_pull(rank: int, ref: Any) -> None:
    try:
        await ref
    except TransferError:
        raise
    except Exception as e:  # noqa: BLE001 - a follower's failure (or death) fails the pull
        raise TransferError(f"decode rank {rank}: {type(e).__name__}: {e}") from None


async def _settle(mine: asyncio.Future[Any], refs: list[Any], theirs: Sequence[asyncio.Future[None]],
                  timeout: float) -> None:
    """Cancels every pull still running (rank 0's task and the followers' actor calls; a caller
    cancelled inside gather() has already cancelled the tasks that only await those calls) and
    waits, at most timeout + 5 s, until each has really ended."""
    import ray

    mine.cancel()
    for ref in refs:
        ray.cancel(ref)  # a no-op for a call that already ended
    ended = [asyncio.ensure_future(_ended(ref)) for ref in refs]
    await asyncio.wait([mine, *ended], timeout=timeout + 5.0)
    for task in (mine, *theirs):
        task.add_done_callback(lambda t: t.cancelled() or t.exception())


async def _ended(ref: Any) -> None:
    """Returns once a follower's call has ended, however it ended."""
    try:
        await ref
    except BaseException:  # noqa: BLE001 - only the end matters here
        pass
