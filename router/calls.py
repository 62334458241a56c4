"""Calls to worker replicas, apart from any one request: bounded waits, failures, lease release.

Every wait on a worker is bounded: `watched` abandons a call to a replica the registry forgot (silent
for 3 heartbeats), since a peer that died without closing its connection would otherwise hold the
call until its deadline.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

import grpc
from pdserve.v1 import worker_pb2

from router.errors import RouterError, worker_error
from router.registry import Registry, Replica

# Worker answers after which the request moves to another replica: the replica is gone, or it has
# no room (decode: before pulling, so the KV lease still holds).
RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED})
T = TypeVar("T")


class ReplicaLost(Exception):
    """The registry forgot the replica while a call to it was waiting (silent, likely dead)."""


class Failed(Exception):
    """A worker call failed: `code` is the worker's status, `error` what the client would see."""

    def __init__(self, code: grpc.StatusCode, error: RouterError) -> None:
        super().__init__(error.message)
        self.code = code
        self.error = error


def call_failed(stage: str, replica: Replica, exc: Exception) -> Failed:
    """The Failed for a call to `replica` that raised `exc` (a gRPC error or ReplicaLost)."""
    if isinstance(exc, grpc.aio.AioRpcError):
        return Failed(exc.code(), worker_error(stage, replica.replica_id, exc))
    message = f"{stage} replica {replica.replica_id}: UNAVAILABLE: {exc}"
    return Failed(grpc.StatusCode.UNAVAILABLE, RouterError(grpc.StatusCode.UNAVAILABLE, message))


async def watched(replica: Replica, registry: Registry, every: float, aw: Awaitable[T]) -> T:
    """Awaits a call to `replica`, checking every `every` seconds that the registry still knows it;
    raises ReplicaLost once it does not (the call is cancelled)."""
    task = asyncio.ensure_future(aw)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=every)
            if done:
                return task.result()
            if registry.get(replica.replica_id) is not replica:
                raise ReplicaLost(f"replica {replica.replica_id} stopped heartbeating")
    finally:
        if not task.done():
            task.cancel()


async def release_kv(replica: Replica, request_id: str, timeout: float) -> None:
    """ReleaseKV, best effort: a replica that is gone or busy lets the lease expire on its own."""
    try:
        await replica.prefill.ReleaseKV(worker_pb2.ReleaseKVRequest(request_id=request_id), timeout=timeout)
    except grpc.aio.AioRpcError:
        pass


def blocks_needed(num_tokens: int, max_tokens: int, block_size: int) -> int:
    return -(-(num_tokens + max_tokens) // block_size)
