"""What one KV source may serve, per request: the blocks, to whom (the lease token), until when,
and for a request still being prefilled, how many of its blocks hold computed KV.

The prefill worker owns the lease itself (prefill_worker/lease.py: its states, timer and ranks);
a source only keeps the grant that lease gave it, and answers pulls against it. Thread-safe:
torch_dist serves from threads, ucx from its own event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

from pdserve.v1 import kv_pb2


@dataclass(frozen=True, slots=True)
class Grant:
    block_ids: frozenset[int]  # the blocks a pull may name
    expiry: float  # unix seconds
    token: bytes = b""  # a pull must carry it (empty: any pull)
    table: tuple[int, ...] | None = None  # streamed: the block table so far, token order
    ready_blocks: int = 0  # streamed: leading blocks of table whose KV is computed
    first_token: int | None = None  # streamed: set once the prefill ended


def grant(block_ids: Sequence[int], expiry: float, token: bytes) -> Grant:
    return Grant(frozenset(block_ids), expiry, token)


def streamed_grant(block_ids: Sequence[int], ready_blocks: int, expiry: float, first_token: int | None,
                   token: bytes) -> Grant:
    return Grant(frozenset(block_ids), expiry, token, tuple(block_ids), ready_blocks, first_token)


class Grants:
    """request id -> Grant, with waits for a streamed request's blocks (never polled: every
    change wakes the waiters, which re-check their request)."""

    def __init__(self) -> None:
        self._grants: dict[str, Grant] = {}
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)  # wait_ready_blocking sleeps on it
        self._waiters: set[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = set()  # wait_ready

    def put(self, request_id: str, new: Grant) -> None:
        with self._lock:
            self._grants[request_id] = new
        self._notify()

    def drop(self, request_id: str) -> None:
        with self._lock:
            self._grants.pop(request_id, None)
        self._notify()

    def clear(self) -> None:
        with self._lock:
            self._grants.clear()
        self._notify()

    def leased_blocks(self) -> int:
        """Blocks under a grant that has not expired."""
        now = time.time()
        with self._lock:
            return sum(len(g.block_ids) for g in self._grants.values() if g.expiry >= now)

    def expired(self, now: float) -> list[str]:
        """Drops and returns the request ids whose grant ran out."""
        with self._lock:
            gone = [rid for rid, g in self._grants.items() if g.expiry < now]
            for rid in gone:
                del self._grants[rid]
        return gone

    def check(self, req: kv_pb2.PullRequest) -> str | None:
        """Why req may not be served now (None: it may): no grant, wrong token, expired, or
        blocks outside the grant."""
        with self._lock:
            held = self._grants.get(req.request_id)
            if held is None:
                return f"no lease for request {req.request_id!r}"
            if held.token and not hmac.compare_digest(held.token, req.lease_token):
                return f"wrong lease token for request {req.request_id!r}"
            if held.expiry < time.time():
                del self._grants[req.request_id]
                return f"lease of {req.request_id!r} expired"
        if not req.block_ids or not set(req.block_ids) <= held.block_ids:
            return f"block ids not leased to {req.request_id!r}"
        return None

    def covers(self, req: kv_pb2.PullRequest) -> bool:
        """Whether req's blocks are granted to it now."""
        with self._lock:
            held = self._grants.get(req.request_id)
        return held is not None and held.expiry >= time.time() and set(req.block_ids) <= held.block_ids

    def resolve(self, req: kv_pb2.PullRequest) -> int | None | str:
        """Turns a by_index request's indices into block ids (in place). Returns the first token when
        the request reaches the end of a finished prefill, None otherwise, or an error string."""
        with self._lock:
            held = self._grants.get(req.request_id)
        if held is None or held.table is None:
            return f"no streamed lease for request {req.request_id!r}"
        indices = list(req.block_ids)
        if not indices or max(indices) >= held.ready_blocks:
            return f"blocks of {req.request_id!r} not computed yet ({held.ready_blocks} ready)"
        req.block_ids[:] = [held.table[i] for i in indices]
        req.by_index = False
        ends = max(indices) + 1 == len(held.table) == held.ready_blocks
        return held.first_token if ends else None

    async def wait_ready(self, req: kv_pb2.PullRequest, timeout: float) -> None:
        """Returns once req's blocks are computed, it has no streamed grant, or timeout passed."""
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

    def wait_ready_blocking(self, req: kv_pb2.PullRequest, timeout: float) -> None:
        """wait_ready for a thread."""
        with self._changed:
            self._changed.wait_for(lambda: self._ready_locked(req), timeout)

    def _ready_locked(self, req: kv_pb2.PullRequest) -> bool:
        held = self._grants.get(req.request_id)
        return held is None or held.table is None or max(req.block_ids, default=0) < held.ready_blocks

    def _notify(self) -> None:
        with self._lock:
            self._changed.notify_all()
            waiters = list(self._waiters)
        for loop, fut in waiters:
            with contextlib.suppress(RuntimeError):  # that loop is closed
                loop.call_soon_threadsafe(_wake, fut)


def _wake(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)
