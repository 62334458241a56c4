"""In-process backend for unit tests of the workers: same validation and payload path, no wire.

A `FakeRegistry` (created by the test, passed to every source and puller) maps endpoints to
sources. Requests and responses still go through protobuf bytes so the fake cannot drift from
the real backends' contract.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import torch
from pdserve.v1 import kv_pb2

from kv_transfer.interfaces import TransferError, TransferState
from kv_transfer.puller import KVPuller, ShardPull
from kv_transfer.source import KVSource


class FakeRegistry:
    """Endpoint name -> source, for one test (no module-level state)."""

    def __init__(self) -> None:
        self._sources: dict[str, FakeSource] = {}
        self._next = 0

    def add(self, source: FakeSource, host: str) -> str:
        self._next += 1
        endpoint = f"{host}:{self._next}"
        self._sources[endpoint] = source
        return endpoint

    def remove(self, endpoint: str) -> None:
        self._sources.pop(endpoint, None)

    def get(self, endpoint: str) -> FakeSource:
        source = self._sources.get(endpoint)
        if source is None:
            raise TransferError(f"no source at {endpoint}")
        return source


class FakeSource(KVSource):
    def __init__(
        self, kv: torch.Tensor, rank: int, tp_size: int, num_kv_heads: int, *, registry: FakeRegistry
    ) -> None:
        super().__init__(kv, rank, tp_size, num_kv_heads)
        self._registry = registry
        self.endpoint: str | None = None

    async def start(self, host: str) -> str:
        self.endpoint = self._registry.add(self, host)
        return self.endpoint

    async def close(self) -> None:
        if self.endpoint is not None:
            self._registry.remove(self.endpoint)
            self.endpoint = None
        self.drop_leases()


class FakePuller(KVPuller):
    def __init__(
        self,
        kv: torch.Tensor,
        rank: int,
        tp_size: int,
        num_kv_heads: int,
        *,
        registry: FakeRegistry,
        delay: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(kv, rank, tp_size, num_kv_heads)
        self._registry = registry
        self._delay = delay  # seconds per shard, to exercise timeouts in worker tests
        self._clock = clock

    async def _pull_shard(self, pull: ShardPull) -> kv_pb2.PullResponse:
        request = pull.request
        self._set_state(request.request_id, TransferState.CONNECTING)
        source = self._registry.get(pull.endpoint)
        if self._delay:
            await asyncio.sleep(self._delay)
        await source.wait_ready(request.SerializeToString(), max(0.0, pull.deadline - time.monotonic()))
        answer = source.answer(request.SerializeToString())
        response = kv_pb2.PullResponse.FromString(answer.response.SerializeToString())
        if not response.ok:
            raise TransferError(f"source {pull.endpoint} refused: {response.error}")
        self._set_state(request.request_id, TransferState.TRANSFERRING)
        landing = self._landing(pull)
        landing.expect(response.payload_bytes, pull.endpoint)
        for buf, tensor in zip(landing.buffers, answer.tensors, strict=True):
            buf.copy_(tensor)
        answer.sent()
        landing.finish()
        return response

    async def close(self) -> None:
        return None
