"""The prefill side of a transfer: `KVSource` serves one TP rank's KV blocks to decode ranks.

Wire: a decode rank sends a `pdserve.v1.kv_pb2.PullRequest`; the source answers with a
`PullResponse`; when ok, the payload follows as one raw message per segment (see payload.py).
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from pdserve.v1 import kv_pb2

from kv_transfer.grants import Grants, grant, streamed_grant
from kv_transfer.host import HOST_ID, local_pool
from kv_transfer.interfaces import MAX_REQUEST_BYTES, MAX_SEGMENTS, RankKV, TransferError
from kv_transfer.payload import StagingPool, source_tensors


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


class KVSource(RankKV, ABC):
    """Prefill side: serves one TP rank's KV blocks to decode ranks.

    The prefill worker calls: `await start(host)` once (the endpoint goes into every RankShard),
    `lease(request_id, block_ids, expiry)` when a request's prefill is done (the blocks stay
    allocated) or `stream_lease(...)` as a streamed prefill advances, `unlease(request_id)` on
    ReleaseKV, expiry or abort, and `await close()` at shutdown. The lease's state and timer are
    the worker's (prefill_worker/lease.py); the source keeps only the grant it serves against.
    The backend calls `wait_ready` (or `wait_ready_blocking`) then `answer(request_bytes)` for
    every PullRequest it receives, and sends the result; a refused or malformed request never
    stops the source.
    """

    def __init__(self, kv: torch.Tensor, rank: int, tp_size: int, num_kv_heads: int) -> None:
        super().__init__(kv, rank, tp_size, num_kv_heads)
        self.grants = Grants()
        self.pool = StagingPool()
        self.local = local_pool(kv)  # set: pullers on this host may copy from the pool themselves

    @abstractmethod
    async def start(self, host: str) -> str:
        """Starts serving on host (port from the backend's config; 0 = ephemeral); returns the
        endpoint string decode ranks connect to."""

    @abstractmethod
    async def close(self) -> None:
        """Stops serving and frees the backend's resources; leases are dropped (drop_leases)."""

    def lease(self, request_id: str, block_ids: Sequence[int], expiry: float, token: bytes = b"") -> None:
        """Allows pulls of block_ids for request_id until expiry (unix seconds); with a token, only
        pulls whose PullRequest.lease_token equals it."""
        self._check_ids(request_id, block_ids)
        self.grants.put(request_id, grant(block_ids, expiry, token))

    def stream_lease(self, request_id: str, block_ids: Sequence[int], ready_blocks: int, expiry: float,
                     first_token: int | None = None, token: bytes = b"") -> None:
        """A streamed lease (kv_transfer.streaming): the request's block table so far, of which the
        first ready_blocks hold computed KV; first_token once the prefill ended. Called again as the
        prefill advances; pulls by index (PullRequest.by_index) are answered once their blocks are
        ready."""
        self._check_ids(request_id, block_ids)
        self.grants.put(request_id, streamed_grant(block_ids, ready_blocks, expiry, first_token, token))

    def unlease(self, request_id: str) -> None:
        self.grants.drop(request_id)

    def drop_leases(self) -> None:
        """Every grant ends (the backend's close)."""
        self.grants.clear()

    def leased_blocks(self) -> int:
        """Blocks under a lease that has not expired."""
        return self.grants.leased_blocks()

    def expired(self, now: float | None = None) -> list[str]:
        """Drops and returns the request ids whose lease ran out."""
        return self.grants.expired(time.time() if now is None else now)

    async def wait_ready(self, data: bytes, timeout: float) -> None:
        """Returns once a by_index PullRequest's blocks are computed (or it cannot be: no lease,
        malformed, timeout); answer() then answers or refuses it. Other requests return at once."""
        req = _by_index(data)
        if req is not None:
            await self.grants.wait_ready(req, timeout)

    def wait_ready_blocking(self, data: bytes, timeout: float) -> None:
        """wait_ready for backends that serve from threads."""
        req = _by_index(data)
        if req is not None:
            self.grants.wait_ready_blocking(req, timeout)

    def still_leased(self, req: kv_pb2.PullRequest) -> bool:
        """Whether req's blocks are leased to it now (answered after a same-host copy: a lease never
        comes back, so leased at its end means leased throughout)."""
        return self.grants.covers(req)

    def answer(self, data: bytes) -> Answer:
        """Validates one serialized PullRequest and builds the payload (views or gathered copies)."""
        if len(data) > MAX_REQUEST_BYTES:
            return refuse(f"request of {len(data)} bytes exceeds {MAX_REQUEST_BYTES}")
        try:
            req = kv_pb2.PullRequest.FromString(data)
        except Exception as e:  # noqa: BLE001 - any decode error is the peer's fault
            return refuse(f"malformed PullRequest: {e}")
        first_token = None
        if req.by_index:
            resolved = self.grants.resolve(req)
            if isinstance(resolved, str):
                return refuse(resolved)
            first_token = resolved
        error = self.grants.check(req) or self._check_shape(req)
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

    def _check_ids(self, request_id: str, block_ids: Sequence[int]) -> None:
        num_blocks = self.kv.shape[0]
        if any(not 0 <= b < num_blocks for b in block_ids):
            raise TransferError(f"lease of {request_id}: block id out of [0, {num_blocks})")

    def _check_shape(self, req: kv_pb2.PullRequest) -> str | None:
        if not 0 <= req.head_start < req.head_end <= self.kv.shape[3]:
            return f"bad head range [{req.head_start}, {req.head_end}) of {self.kv.shape[3]} heads"
        segments = list(req.segments)
        if segments and (
            len(segments) > MAX_SEGMENTS or min(segments) <= 0 or sum(segments) != len(req.block_ids)
        ):
            return f"bad segments {segments[:8]}... for {len(req.block_ids)} blocks"
        return None


def _by_index(data: bytes) -> kv_pb2.PullRequest | None:
    """The request, when it is a by_index pull (the only kind that waits for blocks)."""
    try:
        req = kv_pb2.PullRequest.FromString(data)
    except Exception:  # noqa: BLE001 - answer() refuses it
        return None
    return req if req.by_index else None
