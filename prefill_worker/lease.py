"""One request's KV lease on a prefill replica: a state machine that owns its expiry timer and
the TP ranks whose KV sources serve the blocks.

  RUNNING ---open()---> LEASED      Prefill: the prompt is done; every rank serves every block
  RUNNING ---open()---> STREAMING   PrefillStream: the ranks serve the blocks computed so far;
  STREAMING --stream(first_token)--> LEASED   once the first token is sampled
  LEASED | STREAMING ---release()---> RELEASED   ReleaseKV, a cancelled or failed call: ranks
                                                  unleased, then the engine frees the blocks
  LEASED | STREAMING ---timer---> EXPIRED         the same, when nobody released it in time
  LEASED ---adopt()---> RELEASED                  colocated: a local decode takes the blocks over

A release while RUNNING marks the lease unwanted (nothing is held outside the engine yet); the
call that runs the prefill then ends it. A release that lands while the ranks are being told
makes the telling raise LeaseLost, and the caller frees again (`drop`): a rank told after the
release's unlease would otherwise keep serving freed blocks.
"""

from __future__ import annotations

import asyncio
import enum
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class RankLease:
    """How the replica leases blocks on one rank's KV source (local call or a Ray actor call)."""

    rank: int
    endpoint: str
    lease: Callable[[str, list[int], float, bytes], Awaitable[None]]  # request id, blocks, expiry, token
    unlease: Callable[[str], Awaitable[None]]
    # streamed lease (PrefillStream): request id, block table so far, ready blocks, expiry, first token,
    # lease token
    stream_lease: Callable[[str, list[int], int, float, int | None, bytes], Awaitable[None]] | None = None
    host_id: str = ""  # the rank's host (kv_transfer.host.HOST_ID), for decode's choice of source


class LeaseState(enum.Enum):
    RUNNING = "running"
    LEASED = "leased"
    STREAMING = "streaming"
    RELEASED = "released"
    EXPIRED = "expired"


HELD = (LeaseState.LEASED, LeaseState.STREAMING)


class LeaseLost(Exception):
    """The request was released while its lease was being set up (its blocks are already free)."""


@dataclass(eq=False, slots=True)
class Lease:
    rid: str
    token: bytes  # the secret a puller must present
    ranks: tuple[RankLease, ...]
    free_blocks: Callable[[str], None]  # the engine's abort: frees the held blocks
    on_end: Callable[[Lease], None]  # the book forgets it
    state: LeaseState = LeaseState.RUNNING
    answering: bool = True  # the Prefill call has not answered yet
    unwanted: bool = False  # released while RUNNING: the call frees it
    num_blocks: int = 0
    expiry: float = 0.0  # unix seconds, once open
    _timer: asyncio.TimerHandle | None = field(default=None, repr=False)

    @property
    def held(self) -> bool:
        return self.state in HELD

    def open(self, seconds: float, num_blocks: int, streamed: bool = False) -> float:
        """RUNNING -> LEASED or STREAMING: starts the expiry timer; returns the expiry."""
        assert self.state is LeaseState.RUNNING, self.state
        self._timer = asyncio.get_running_loop().call_later(seconds, self._expire)
        self.state = LeaseState.STREAMING if streamed else LeaseState.LEASED
        self.num_blocks = num_blocks
        self.expiry = time.time() + seconds
        return self.expiry

    async def grant(self, blocks: Sequence[int]) -> None:
        """Every rank serves blocks until the expiry; LeaseLost if released meanwhile."""
        self.check_held()
        self.num_blocks = len(blocks)
        await asyncio.gather(*(r.lease(self.rid, list(blocks), self.expiry, self.token) for r in self.ranks))
        self.check_held()

    async def stream(self, blocks: Sequence[int], ready_blocks: int, first_token: int | None = None) -> None:
        """Every rank serves the first ready_blocks of blocks (all of them, with the first token:
        the lease is then LEASED); LeaseLost if released meanwhile."""
        self.check_held()
        self.num_blocks = len(blocks)
        await asyncio.gather(*(
            r.stream_lease(self.rid, list(blocks), ready_blocks, self.expiry, first_token, self.token)
            for r in self.ranks if r.stream_lease is not None
        ))
        self.check_held()
        if first_token is not None:
            self.state = LeaseState.LEASED

    def check_held(self) -> None:
        if not self.held:
            raise LeaseLost(f"{self.rid} was released while its KV was being leased")

    async def release(self) -> bool:
        """Ends a held lease and frees its blocks (True); marks a RUNNING one unwanted (False)."""
        if self.state is LeaseState.RUNNING:
            self.unwanted = True
            return False
        if not self._end(LeaseState.RELEASED):
            return False
        await self._free()
        return True

    async def drop(self) -> None:
        """The call failed or lost a race: frees whatever the lease may have given out, in any
        state (a rank told after a release's unlease is unleased again); runs to the end even
        when the caller is cancelled."""
        if not self._end(LeaseState.RELEASED) and self.state is LeaseState.RUNNING:
            self.state = LeaseState.RELEASED
        await asyncio.shield(self._free())

    def adopt(self) -> bool:
        """The blocks pass to a decode on this engine: the lease ends, nothing is freed."""
        return self._end(LeaseState.RELEASED)

    def _expire(self) -> None:
        if self._end(LeaseState.EXPIRED):
            asyncio.ensure_future(self._free())

    def _end(self, state: LeaseState) -> bool:
        if not self.held:
            return False
        self.state = state
        if self._timer is not None:
            self._timer.cancel()
        self.on_end(self)
        return True

    async def _free(self) -> None:
        await asyncio.gather(*(r.unlease(self.rid) for r in self.ranks), return_exceptions=True)
        self.free_blocks(self.rid)  # works on a dead engine too (a no-op)


class Leases:
    """The replica's leases by request id, from the call's start until its lease ends.

    `rid in leases` and `len(leases)` count the leases held now (LEASED or STREAMING);
    `get(rid)` also finds a call still running.
    """

    def __init__(self, ranks: Sequence[RankLease], free_blocks: Callable[[str], None]) -> None:
        self._ranks = tuple(ranks)
        self._free_blocks = free_blocks
        self._by_id: dict[str, Lease] = {}

    def begin(self, rid: str, token: bytes) -> Lease:
        """A Prefill call starts (rid must not be in use)."""
        lease = Lease(rid, token, self._ranks, self._free_blocks, self._forget_ended)
        self._by_id[rid] = lease
        return lease

    def answered(self, lease: Lease) -> None:
        """Its call ended: keep the lease only while it is held."""
        lease.answering = False
        if not lease.held:
            self._forget(lease)

    def in_use(self, rid: str) -> bool:
        return rid in self._by_id

    def get(self, rid: str) -> Lease | None:
        return self._by_id.get(rid)

    async def release(self, rid: str) -> bool:
        """Ends rid's lease and frees its blocks; runs to the end even when the caller is cancelled
        (a ReleaseKV whose deadline passes mid-way used to leave the blocks held with no lease)."""
        lease = self._by_id.get(rid)
        return lease is not None and await asyncio.shield(lease.release())

    def adopt(self, rid: str) -> bool:
        """The held blocks pass to a local decode; False if already gone."""
        lease = self._by_id.get(rid)
        return lease is not None and lease.adopt()

    def leased_blocks(self) -> int:
        return sum(lease.num_blocks for lease in self._held())

    def running(self) -> frozenset[str]:
        """Requests whose Prefill call has not answered yet."""
        return frozenset(rid for rid, lease in self._by_id.items() if lease.answering)

    def unwanted(self) -> frozenset[str]:
        """Requests released while their prefill still ran."""
        return frozenset(rid for rid, lease in self._by_id.items() if lease.unwanted)

    def __contains__(self, rid: object) -> bool:
        lease = self._by_id.get(rid) if isinstance(rid, str) else None
        return lease is not None and lease.held

    def __len__(self) -> int:
        return sum(1 for _ in self._held())

    def _held(self) -> Iterator[Lease]:
        return (lease for lease in self._by_id.values() if lease.held)

    def _forget_ended(self, lease: Lease) -> None:
        if not lease.answering:
            self._forget(lease)

    def _forget(self, lease: Lease) -> None:
        if self._by_id.get(lease.rid) is lease:
            del self._by_id[lease.rid]
