"""The decode side of a transfer: `KVPuller` pulls a request's KV blocks from every prefill rank
that holds a share of them (re-sharding heads when the TP sizes differ, reshard.py)."""

from __future__ import annotations

import asyncio
import time
from abc import ABC, abstractmethod
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from pdserve.v1 import kv_pb2

from kv_transfer.handle import KVHandle, dtype_name
from kv_transfer.host import HOST_ID
from kv_transfer.interfaces import MAX_TRACKED_STATES, RankKV, TransferError, TransferState
from kv_transfer.payload import Landing, StagingPool, make_landing, plan_segments
from kv_transfer.reshard import PullPlan, plan_pulls


@dataclass(frozen=True, slots=True)
class ShardPull:
    """One prefill rank's part of a pull: which source, what to ask it, where its KV lands."""

    endpoint: str
    request: kv_pb2.PullRequest
    dst_block_ids: list[int]
    dst_heads: tuple[int, int]  # this rank's heads the payload fills: [start, end)
    deadline: float  # time.monotonic() seconds


class KVPuller(RankKV, ABC):
    """Decode side: pulls a request's KV blocks into blocks this rank allocated.

    The decode worker calls `await pull(handle, dst_block_ids, timeout)` once per request (raises
    TransferError; on failure the destination blocks hold garbage and should be freed), may read
    `state(request_id)` and should `forget(request_id)` when done; `await close()` at shutdown.
    Backends implement `_pull_shard` (one prefill rank) and `close`.
    """

    def __init__(self, kv: torch.Tensor, rank: int, tp_size: int, num_kv_heads: int) -> None:
        super().__init__(kv, rank, tp_size, num_kv_heads)
        self._states: dict[str, TransferState] = {}
        self.pool = StagingPool()

    def state(self, request_id: str) -> TransferState:
        return self._states.get(request_id, TransferState.PENDING)

    def forget(self, request_id: str) -> None:
        self._states.pop(request_id, None)

    def _set_state(self, request_id: str, state: TransferState) -> None:
        if self._states.get(request_id) is not TransferState.FAILED:
            self._states[request_id] = state

    def _start_state(self, request_id: str) -> None:
        self._states.pop(request_id, None)
        while len(self._states) >= MAX_TRACKED_STATES:  # oldest first: bounded without forget()
            del self._states[next(iter(self._states))]
        self._states[request_id] = TransferState.PENDING

    async def pull(self, handle: KVHandle, dst_block_ids: Sequence[int], timeout: float) -> None:
        """Pulls every prefill rank's share of handle into kv[dst_block_ids] (same order)."""
        await self._pull(handle, dst_block_ids, timeout, by_index=False)

    async def pull_chunk(self, handle: KVHandle, first_block: int, dst_block_ids: Sequence[int],
                         timeout: float) -> int | None:
        """Streamed handle (stream_chunk_blocks > 0, no block ids): pulls the request's blocks
        [first_block, first_block + len(dst_block_ids)) into kv[dst_block_ids] once the source has
        computed them (timeout covers the wait). Returns the prefill's first token when this chunk
        ends the prompt, else None."""
        n = len(dst_block_ids)
        end_token = min(handle.num_tokens, (first_block + n) * handle.block_size)
        chunk = replace(
            handle,
            num_tokens=end_token - first_block * handle.block_size,
            shards=tuple(replace(s, block_ids=tuple(range(first_block, first_block + n))) for s in handle.shards),
        )
        responses = await self._pull(chunk, dst_block_ids, timeout, by_index=True)
        return next((r.first_token for r in responses if r.HasField("first_token")), None)

    async def _pull(self, handle: KVHandle, dst_block_ids: Sequence[int], timeout: float,
                    by_index: bool) -> list[kv_pb2.PullResponse]:
        rid = handle.request_id
        self._start_state(rid)
        try:
            self._check_handle(handle, dst_block_ids)
            near = [s.rank for s in handle.shards if s.host_id and s.host_id == HOST_ID]
            plans = plan_pulls(handle.tp_size, self.tp_size, self.rank, self.num_kv_heads, near)
            deadline = time.monotonic() + timeout
            coros = [self._pull_plan(handle, p, list(dst_block_ids), deadline, by_index) for p in plans]
            responses = await asyncio.wait_for(_all_or_cancel(coros), timeout)
        except Exception as e:
            self._states[rid] = TransferState.FAILED
            if isinstance(e, TransferError):
                raise
            if isinstance(e, asyncio.TimeoutError):
                raise TransferError(f"pull of {rid} timed out after {timeout}s") from e
            raise TransferError(f"pull of {rid} failed: {type(e).__name__}: {e}") from e
        self._states[rid] = TransferState.DONE
        return responses

    async def _pull_plan(self, handle: KVHandle, plan: PullPlan, dst: list[int], deadline: float,
                         by_index: bool = False) -> kv_pb2.PullResponse:
        shard = handle.shards[plan.src_rank]
        full = plan.dst_heads == (0, self.kv.shape[3])
        segments = plan_segments(list(shard.block_ids), dst, full)
        req = kv_pb2.PullRequest(
            request_id=handle.request_id,
            block_ids=list(shard.block_ids),
            head_start=plan.src_heads[0],
            head_end=plan.src_heads[1],
            segments=segments,
            by_index=by_index,
            lease_token=handle.lease_token,
        )
        return await self._pull_shard(ShardPull(shard.endpoint, req, dst, plan.dst_heads, deadline))

    @abstractmethod
    async def _pull_shard(self, pull: ShardPull) -> kv_pb2.PullResponse:
        """Sends pull.request to the source at pull.endpoint, lands the payload with
        payload.Landing and returns the source's (ok) PullResponse."""

    def _landing(self, pull: ShardPull) -> Landing:
        """Where pull's payload segments are received (its blocks, or staging when scattered)."""
        return make_landing(self.kv, pull.dst_block_ids, list(pull.request.segments), pull.dst_heads, self.pool)

    @abstractmethod
    async def close(self) -> None:
        """Drops every connection; later pulls reconnect."""

    def _check_handle(self, handle: KVHandle, dst_block_ids: Sequence[int]) -> None:
        handle.validate()
        _, layers, _, _, block_size, head_dim = self.kv.shape
        ours = (layers, block_size, head_dim, self.num_kv_heads, dtype_name(self.kv.dtype))
        theirs = (handle.num_layers, handle.block_size, handle.head_dim, handle.num_kv_heads, handle.dtype)
        if ours != theirs:
            raise TransferError(f"layout mismatch: (layers, block, head_dim, heads, dtype) {theirs} vs ours {ours}")
        if len(dst_block_ids) != handle.num_blocks:
            raise TransferError(f"{len(dst_block_ids)} destination blocks for {handle.num_blocks}")
        if any(not 0 <= b < self.kv.shape[0] for b in dst_block_ids):
            raise TransferError(f"destination block id out of [0, {self.kv.shape[0]})")


async def _all_or_cancel(coros: list[Coroutine[Any, Any, kv_pb2.PullResponse]]) -> list[kv_pb2.PullResponse]:
    """Runs coros concurrently (their results, in order); the first failure cancels the rest and
    propagates."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
