"""Transfer interfaces: the prefill side serves KV blocks (`KVSource`), the decode side pulls them
(`KVPuller`). Backends (ucx, torch_dist, fake) implement only the transport; leases, request
validation, re-sharding and payload layout live here and in `payload.py`.

Wire: a decode rank sends a `pdserve.v1.kv_pb2.PullRequest`; the source answers with a
`PullResponse`; when ok, the payload follows as one raw message per segment (see payload.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import hmac
import os
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import torch
from pdserve.v1 import kv_pb2

from engine.kv_cache import shared_pool
from engine.tp import kv_heads_per_rank, tp_kv_error

if TYPE_CHECKING:
    from kv_transfer.handle import KVHandle
    from kv_transfer.payload import StagingPool
    from kv_transfer.reshard import PullPlan

MAX_REQUEST_BYTES = 1 << 20  # a PullRequest larger than this is rejected unread
MAX_SEGMENTS = 64  # payload messages per pull
MAX_TRACKED_STATES = 4096  # per puller; the oldest transfer states are dropped first


class TransferError(RuntimeError):
    """A pull failed: bad metadata, refused by the source, peer gone, or timed out."""


class TransferState(enum.Enum):
    PENDING = "pending"  # pull() called (or not yet), nothing sent
    CONNECTING = "connecting"  # reaching a source / forming a channel
    TRANSFERRING = "transferring"  # a source accepted; payload in flight
    DONE = "done"  # every shard written into the destination blocks
    FAILED = "failed"  # TransferError raised; destination blocks hold garbage


def check_layout(kv: torch.Tensor, rank: int, tp_size: int, num_kv_heads: int) -> None:
    """kv must be [num_blocks, num_layers, 2, heads of the rank, block_size, head_dim] (heads of
    the rank: num_kv_heads / tp_size, or 1 when tp_size exceeds num_kv_heads)."""
    if kv.dim() != 6 or kv.shape[2] != 2 or not kv.is_contiguous():
        raise TransferError(f"kv must be a contiguous 6-d [N, L, 2, H, B, D] tensor, got {tuple(kv.shape)}")
    if tp_size <= 0 or not 0 <= rank < tp_size or num_kv_heads <= 0 or tp_kv_error(num_kv_heads, tp_size):
        raise TransferError(f"bad rank {rank} / tp_size {tp_size} for {num_kv_heads} heads")
    heads = kv_heads_per_rank(num_kv_heads, tp_size)
    if kv.shape[3] != heads:
        raise TransferError(f"kv has {kv.shape[3]} heads, rank of {tp_size} needs {heads}")


@dataclass(slots=True)
class Answer:
    """A source's reply to one PullRequest: the response, then (when ok) the payload segments."""

    response: kv_pb2.PullResponse
    tensors: list[torch.Tensor] = field(default_factory=list)  # contiguous, one per segment
    request: kv_pb2.PullRequest | None = None
    staged: list[torch.Tensor] = field(default_factory=list)  # tensors owned by pool
    pool: StagingPool | None = None

    def sent(self) -> None:
        """Call once the payload is sent: staging buffers go back to the pool."""
        if self.pool is not None:
            for t in self.staged:
                self.pool.give(t)
        self.staged = []


def refuse(error: str) -> Answer:
    return Answer(kv_pb2.PullResponse(ok=False, error=error))


@dataclass(frozen=True, slots=True)
class StreamedLease:
    """What a source knows of a request still being prefilled (see KVSource.stream_lease)."""

    block_ids: tuple[int, ...]  # the request's block table so far, token order
    ready_blocks: int  # leading blocks whose KV is computed
    first_token: int | None  # set once the prefill ended


class KVSource(ABC):
    """Prefill side: serves one TP rank's KV blocks to decode ranks.

    The prefill worker calls: `await start(host)` once (the endpoint goes into every RankShard),
    `lease(request_id, block_ids, expiry)` when a request's prefill is done (the blocks stay
    allocated), `unlease(request_id)` on ReleaseKV or abort, `expired()` periodically to free the
    blocks of leases that ran out, and `await close()` at shutdown.
    The backend calls `answer(request_bytes)` for every PullRequest it receives and sends the
    result; a refused or malformed request never stops the source.
    """

    def __init__(self, kv: torch.Tensor, rank: int, tp_size: int, num_kv_heads: int) -> None:
        check_layout(kv, rank, tp_size, num_kv_heads)
        self.kv = kv  # [N, L, 2, H_rank, B, D]
        self.rank = rank
        self.tp_size = tp_size
        self.num_kv_heads = num_kv_heads
        # request id -> (leased block ids, expiry, token); a lease with an empty token accepts any pull
        self._leases: dict[str, tuple[frozenset[int], float, bytes]] = {}
        self._streams: dict[str, StreamedLease] = {}  # streamed leases: blocks computed so far
        self._fail_next = 0
        self._lock = threading.Lock()  # torch_dist serves from threads, ucx from its own loop
        self._changed = threading.Condition(self._lock)  # a lease changed (wait_ready_blocking)
        self._waiters: set[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = set()  # wait_ready
        self.pool = _pool()
        self.local = _local_pool(kv)  # set: pullers on this host may copy from the pool themselves

    @abstractmethod
    async def start(self, host: str) -> str:
        """Starts serving on host (port from the backend's config; 0 = ephemeral); returns the
        endpoint string decode ranks connect to."""

    @abstractmethod
    async def close(self) -> None:
        """Stops serving and frees the backend's resources; leases are dropped."""

    def lease(self, request_id: str, block_ids: Sequence[int], expiry: float, token: bytes = b"") -> None:
        """Allows pulls of block_ids for request_id until expiry (unix seconds); with a token, only
        pulls whose PullRequest.lease_token equals it."""
        num_blocks = self.kv.shape[0]
        if any(not 0 <= b < num_blocks for b in block_ids):
            raise TransferError(f"lease of {request_id}: block id out of [0, {num_blocks})")
        with self._lock:
            self._leases[request_id] = (frozenset(block_ids), expiry, token)
        self._notify()

    def unlease(self, request_id: str) -> None:
        with self._lock:
            self._leases.pop(request_id, None)
            self._streams.pop(request_id, None)
        self._notify()

    def stream_lease(self, request_id: str, block_ids: Sequence[int], ready_blocks: int, expiry: float,
                     first_token: int | None = None, token: bytes = b"") -> None:
        """A streamed lease (kv_transfer.streaming): the request's block table so far, of which the
        first ready_blocks hold computed KV; first_token once the prefill ended. Called again as the
        prefill advances; pulls by index (PullRequest.by_index) are answered once their blocks are
        ready."""
        self.lease(request_id, block_ids, expiry, token)
        with self._lock:
            self._streams[request_id] = StreamedLease(tuple(block_ids), ready_blocks, first_token)
        self._notify()

    async def wait_ready(self, data: bytes, timeout: float) -> None:
        """Returns once a by_index PullRequest's blocks are computed (or it cannot be: no lease,
        malformed, timeout); answer() then answers or refuses it. Other requests return at once.
        Sleeps until a lease changes (every lease call wakes the waiters), never polls."""
        req = _by_index(data)
        if req is None:
            return
        deadline = time.monotonic() + timeout
        loop = asyncio.get_running_loop()
        while True:
            waiter = (loop, loop.create_future())
            with self._lock:
                if self._ready_locked(req):
                    return
                self._waiters.add(waiter)
            try:
                await asyncio.wait_for(waiter[1], deadline - time.monotonic())
            except asyncio.TimeoutError:
                return
            finally:
                with self._lock:
                    self._waiters.discard(waiter)

    def wait_ready_blocking(self, data: bytes, timeout: float) -> None:
        """wait_ready for backends that serve from threads."""
        req = _by_index(data)
        if req is not None:
            with self._changed:
                self._changed.wait_for(lambda: self._ready_locked(req), timeout)

    def _ready_locked(self, req: kv_pb2.PullRequest) -> bool:
        stream = self._streams.get(req.request_id)
        return stream is None or max(req.block_ids, default=0) < stream.ready_blocks

    def _notify(self) -> None:
        """Wakes every wait_ready and wait_ready_blocking (they re-check their request)."""
        with self._lock:
            self._changed.notify_all()
            waiters = list(self._waiters)
        for loop, fut in waiters:
            with contextlib.suppress(RuntimeError):  # that loop is closed
                loop.call_soon_threadsafe(_wake, fut)

    def leased_blocks(self) -> int:
        """Blocks under a lease that has not expired."""
        now = time.time()
        with self._lock:
            return sum(len(ids) for ids, expiry, _ in self._leases.values() if expiry >= now)

    def expired(self, now: float | None = None) -> list[str]:
        """Drops and returns the request ids whose lease ran out (the worker frees their blocks)."""
        now = time.time() if now is None else now
        with self._lock:
            gone = [rid for rid, (_, expiry, _) in self._leases.items() if expiry < now]
            for rid in gone:
                del self._leases[rid]
        return gone

    def fail_next_pulls(self, n: int) -> None:
        """Fault injection (tests): the next n valid pulls are refused."""
        with self._lock:
            self._fail_next = n

    def answer(self, data: bytes) -> Answer:
        """Validates one serialized PullRequest and builds the payload (views or gathered copies)."""
        from kv_transfer.payload import source_tensors  # payload imports this module

        if len(data) > MAX_REQUEST_BYTES:
            return refuse(f"request of {len(data)} bytes exceeds {MAX_REQUEST_BYTES}")
        try:
            req = kv_pb2.PullRequest.FromString(data)
        except Exception as e:  # noqa: BLE001 - any decode error is the peer's fault
            return refuse(f"malformed PullRequest: {e}")
        first_token = None
        if req.by_index:
            resolved = self._resolve(req)
            if isinstance(resolved, str):
                return refuse(resolved)
            first_token = resolved
        error = self._check(req)
        if error:
            return refuse(error)
        if self.local is not None and req.local_host and req.local_host == HOST_ID:
            response = kv_pb2.PullResponse(ok=True, first_token=first_token, local=self.local,
                                           local_block_ids=req.block_ids)  # resolved, if by index
            return Answer(response, [], req)
        heads = (req.head_start, req.head_end)
        segments = list(req.segments) or [len(req.block_ids)]
        tensors, staged = source_tensors(self.kv, list(req.block_ids), segments, heads, self.pool)
        nbytes = sum(t.numel() * t.element_size() for t in tensors)
        response = kv_pb2.PullResponse(ok=True, payload_bytes=nbytes, first_token=first_token)
        return Answer(response, tensors, req, staged, self.pool)

    def still_leased(self, req: kv_pb2.PullRequest) -> bool:
        """Whether req's blocks are leased to it now (answered after a same-host copy: a lease never
        comes back, so leased at its end means leased throughout)."""
        with self._lock:
            lease = self._leases.get(req.request_id)
        return lease is not None and lease[1] >= time.time() and set(req.block_ids) <= lease[0]

    def _resolve(self, req: kv_pb2.PullRequest) -> int | None | str:
        """Turns a by_index request's indices into block ids (in place). Returns the first token when
        the request reaches the end of a finished prefill, None otherwise, or an error string."""
        with self._lock:
            stream = self._streams.get(req.request_id)
        if stream is None:
            return f"no streamed lease for request {req.request_id!r}"
        indices = list(req.block_ids)
        if not indices or max(indices) >= stream.ready_blocks:
            return f"blocks of {req.request_id!r} not computed yet ({stream.ready_blocks} ready)"
        req.block_ids[:] = [stream.block_ids[i] for i in indices]
        req.by_index = False
        ends = max(indices) + 1 == len(stream.block_ids) == stream.ready_blocks
        return stream.first_token if ends else None

    def _check(self, req: kv_pb2.PullRequest) -> str | None:
        with self._lock:
            lease = self._leases.get(req.request_id)
            if lease is None:
                return f"no lease for request {req.request_id!r}"
            ids, expiry, token = lease
            if token and not hmac.compare_digest(token, req.lease_token):
                return f"wrong lease token for request {req.request_id!r}"
            if expiry < time.time():
                del self._leases[req.request_id]
                return f"lease of {req.request_id!r} expired"
            if self._fail_next > 0:
                self._fail_next -= 1
                return "injected failure (fail_next_pulls)"
        if not req.block_ids or not set(req.block_ids) <= ids:
            return f"block ids not leased to {req.request_id!r}"
        if not 0 <= req.head_start < req.head_end <= self.kv.shape[3]:
            return f"bad head range [{req.head_start}, {req.head_end}) of {self.kv.shape[3]} heads"
        segments = list(req.segments)
        if segments and (
            len(segments) > MAX_SEGMENTS or min(segments) <= 0 or sum(segments) != len(req.block_ids)
        ):
            return f"bad segments {segments[:8]}... for {len(req.block_ids)} blocks"
        return None


class KVPuller(ABC):
    """Decode side: pulls a request's KV blocks into blocks this rank allocated.

    The decode worker calls `await pull(handle, dst_block_ids, timeout)` once per request (raises
    TransferError; on failure the destination blocks hold garbage and should be freed), may read
    `state(request_id)` and should `forget(request_id)` when done; `await close()` at shutdown.
    Backends implement `_pull_shard` (one prefill rank) and `close`.
    """

    def __init__(self, kv: torch.Tensor, rank: int, tp_size: int, num_kv_heads: int) -> None:
        check_layout(kv, rank, tp_size, num_kv_heads)
        self.kv = kv  # [N, L, 2, H_rank, B, D]
        self.rank = rank
        self.tp_size = tp_size
        self.num_kv_heads = num_kv_heads
        self._states: dict[str, TransferState] = {}
        self.pool = _pool()

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
        from kv_transfer.reshard import plan_pulls

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
        from kv_transfer.payload import plan_segments

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
        return await self._pull_shard(shard.endpoint, req, dst, plan.dst_heads, deadline)

    @abstractmethod
    async def _pull_shard(
        self,
        endpoint: str,
        request: kv_pb2.PullRequest,
        dst_block_ids: list[int],
        dst_heads: tuple[int, int],
        deadline: float,  # time.monotonic() seconds
    ) -> kv_pb2.PullResponse:
        """Sends request to the source at endpoint, lands the payload with payload.Landing and
        returns the source's (ok) PullResponse."""

    @abstractmethod
    async def close(self) -> None:
        """Drops every connection; later pulls reconnect."""

    def _check_handle(self, handle: KVHandle, dst_block_ids: Sequence[int]) -> None:
        from kv_transfer.handle import dtype_name

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


def _by_index(data: bytes) -> kv_pb2.PullRequest | None:
    """The request, when it is a by_index pull (the only kind that waits for blocks)."""
    try:
        req = kv_pb2.PullRequest.FromString(data)
    except Exception:  # noqa: BLE001 - answer() refuses it
        return None
    return req if req.by_index else None


def _wake(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


def _host_id() -> str:
    """This kernel's boot id and this process's pid namespace: two processes with the same id can
    reach each other through /proc/<pid>. Empty where that does not hold (not Linux)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
        ns = os.stat("/proc/self/ns/pid")
    except OSError:
        return ""
    return f"{boot}/{ns.st_dev}:{ns.st_ino}"


HOST_ID = _host_id()


def _local_pool(kv: torch.Tensor) -> kv_pb2.LocalPool | None:
    pool = shared_pool(kv)  # only the whole pool allocate_kv made has one, never a view of it
    if pool is None or not HOST_ID:
        return None
    return kv_pb2.LocalPool(pid=pool.pid, fd=pool.fd, inode=pool.inode, num_blocks=kv.shape[0], heads=kv.shape[3])


def _pool() -> StagingPool:
    from kv_transfer.payload import StagingPool

    return StagingPool()


async def _all_or_cancel(coros: list) -> list:
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
