"""Fault injection for tests and drills: nothing on a production path calls this module.

`delay_pulls(service, seconds)` makes a DecodeService wait `seconds` before each KV pull (the
request sits reserved, awaiting its KV, long enough to cancel it there); `delay_pulls(service, 0)`
takes the delay off. A streamed handle waits once, before its first chunk.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from decode_worker.server import DecodeService, Pull, PullChunk
from kv_transfer.handle import KVHandle


@dataclass(frozen=True, slots=True)
class DelayedPull:
    inner: Pull
    seconds: float

    async def __call__(self, handle: KVHandle, blocks: list[int], timeout: float) -> None:
        await asyncio.sleep(self.seconds)
        await self.inner(handle, blocks, timeout)


@dataclass(frozen=True, slots=True)
class DelayedPullChunk:
    inner: PullChunk
    seconds: float

    async def __call__(self, handle: KVHandle, first_block: int, blocks: list[int], timeout: float) -> int | None:
        if first_block == 0:
            await asyncio.sleep(self.seconds)
        return await self.inner(handle, first_block, blocks, timeout)


def delay_pulls(service: DecodeService, seconds: float) -> None:
    """Delays each of `service`'s KV pulls by `seconds` (0: no delay)."""
    pull = service.pull.inner if isinstance(service.pull, DelayedPull) else service.pull
    chunk = service.pull_chunk.inner if isinstance(service.pull_chunk, DelayedPullChunk) else service.pull_chunk
    delayed = seconds > 0
    service.pull = DelayedPull(pull, seconds) if delayed else pull
    if chunk is not None:
        service.pull_chunk = DelayedPullChunk(chunk, seconds) if delayed else chunk
