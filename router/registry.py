"""The replicas the router knows, kept fresh by Registry.Heartbeat; silent ones are forgotten.

A replica is known from its first heartbeat (WorkerStatus) until it is silent for
3 x heartbeat_seconds. The router keeps one gRPC channel per replica and its own counts of work it
sent there (prompt tokens in prefill, decode streams not yet started), which the pickers add to
what the replica last reported.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc
from pdserve.v1 import router_pb2, worker_pb2, worker_pb2_grpc

Role = worker_pb2.WorkerStatus.Role
PREFILL = worker_pb2.WorkerStatus.PREFILL
DECODE = worker_pb2.WorkerStatus.DECODE
SILENT_HEARTBEATS = 3
MAX_SCALING_DECISIONS = 32  # kept for GetStatus, newest last


class RejectedHeartbeat(ValueError):
    """Answered as INVALID_ARGUMENT / FAILED_PRECONDITION to the worker."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(slots=True)
class Replica:
    status: worker_pb2.WorkerStatus
    last_seen: float
    channel: grpc.aio.Channel
    prefill: worker_pb2_grpc.PrefillWorkerStub
    decode: worker_pb2_grpc.DecodeWorkerStub
    outstanding_prompt_tokens: int = 0  # prefill: sent by the router, not answered yet
    reserved_blocks: int = 0            # decode: blocks of streams opened, not started yet
    open_streams: int = 0               # decode: streams the router has open
    prefix_hashes: frozenset[int] = field(default_factory=frozenset)

    @property
    def replica_id(self) -> str:
        return self.status.replica_id

    @property
    def address(self) -> str:
        return self.status.address

    def pickable(self) -> bool:
        return self.status.ready and not self.status.draining


class Registry:
    """Replicas by id. `on_change` runs (synchronously) when a pool gains or loses a ready replica."""

    def __init__(self, heartbeat_seconds: float, block_size: int,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.timeout = SILENT_HEARTBEATS * heartbeat_seconds
        self.block_size = block_size
        self.clock = clock
        self.replicas: dict[str, Replica] = {}
        self.on_change: Callable[[], None] = lambda: None
        self.retired: list[grpc.aio.Channel] = []  # channels of forgotten replicas, to close
        self.scaling: deque[router_pb2.ScalingDecision] = deque(maxlen=MAX_SCALING_DECISIONS)

    def heartbeat(self, status: worker_pb2.WorkerStatus) -> bool:
        """Records a heartbeat; True when the replica was already known."""
        self._check(status)
        before = self._any_pickable()
        known = self.replicas.get(status.replica_id)
        if known is not None and known.address == status.address and known.status.role == status.role:
            known.status = status
            known.last_seen = self.clock()
            known.prefix_hashes = frozenset(status.prefix_hashes)
        else:
            if known is not None:  # restarted elsewhere under the same id
                self._forget(status.replica_id)
            self.replicas[status.replica_id] = self._new_replica(status)
        if self._any_pickable() != before or known is None:
            self.on_change()
        return known is not None

    def report_scaling(self, decision: router_pb2.ScalingDecision) -> None:
        """An autoscaling policy's decision, shown by GetStatus (the latest MAX_SCALING_DECISIONS)."""
        if decision.pool not in ("prefill", "decode"):
            raise RejectedHeartbeat(grpc.StatusCode.INVALID_ARGUMENT, "pool: must be 'prefill' or 'decode'")
        self.scaling.append(decision)

    def _check(self, status: worker_pb2.WorkerStatus) -> None:
        bad = grpc.StatusCode.INVALID_ARGUMENT
        if not status.replica_id:
            raise RejectedHeartbeat(bad, "replica_id: must not be empty")
        if status.role not in (PREFILL, DECODE):
            raise RejectedHeartbeat(bad, "role: must be PREFILL or DECODE")
        if not status.address:
            raise RejectedHeartbeat(bad, "address: must not be empty")
        if status.block_size and status.block_size != self.block_size:
            raise RejectedHeartbeat(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"block_size: replica uses {status.block_size}, the router expects {self.block_size}",
            )
        other = self._fingerprint_other_than(status.replica_id)
        if other and status.model_fingerprint and status.model_fingerprint != other:
            raise RejectedHeartbeat(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"model_fingerprint: replica serves {status.model_fingerprint!r}, others serve {other!r}",
            )

    def _fingerprint_other_than(self, replica_id: str) -> str:
        for r in self.replicas.values():
            if r.replica_id != replica_id and r.status.model_fingerprint:
                return r.status.model_fingerprint
        return ""

    def _new_replica(self, status: worker_pb2.WorkerStatus) -> Replica:
        channel = grpc.aio.insecure_channel(status.address)
        return Replica(
            status=status,
            last_seen=self.clock(),
            channel=channel,
            prefill=worker_pb2_grpc.PrefillWorkerStub(channel),
            decode=worker_pb2_grpc.DecodeWorkerStub(channel),
            prefix_hashes=frozenset(status.prefix_hashes),
        )

    def _forget(self, replica_id: str) -> None:
        self.retired.append(self.replicas.pop(replica_id).channel)

    def expire(self) -> list[str]:
        """Forgets replicas silent for 3 heartbeats; returns their ids."""
        now = self.clock()
        gone = [rid for rid, r in self.replicas.items() if now - r.last_seen > self.timeout]
        if gone:
            before = self._any_pickable()
            for rid in gone:
                self._forget(rid)
            if self._any_pickable() != before:
                self.on_change()
        return gone

    def pool(self, role: int) -> list[Replica]:
        return [r for r in self.replicas.values() if r.status.role == role]

    def ready(self, role: int) -> list[Replica]:
        now = self.clock()
        return [r for r in self.pool(role) if r.pickable() and now - r.last_seen <= self.timeout]

    def serving(self) -> bool:
        return bool(self.ready(PREFILL)) and bool(self.ready(DECODE))

    def _any_pickable(self) -> bool:
        """serving() without the staleness test: what heartbeats and expiry change."""
        return all(any(r.pickable() for r in self.pool(role)) for role in (PREFILL, DECODE))

    def get(self, replica_id: str) -> Replica | None:
        return self.replicas.get(replica_id)

    def take_retired(self) -> list[grpc.aio.Channel]:
        """Channels of forgotten replicas, for the caller to close."""
        retired, self.retired = self.retired, []
        return retired

    async def close(self) -> None:
        for rid in list(self.replicas):
            self._forget(rid)
        for channel in self.take_retired():
            await channel.close(None)
