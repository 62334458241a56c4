"""The prefill replica's gRPC service.

Lifecycle of a request here:
  1. `Prefill` submits the prompt to the engine with hold_kv: the engine runs it in chunks on the TP
     group, samples the first token and keeps the prompt's blocks.
  2. The blocks are leased on every rank's KV source until `lease_seconds` from now, and the reply
     carries the first token and a KVHandle naming every rank's endpoint and block ids.
  3. `ReleaseKV` (from the decode replica once it pulled, or the router when it gives up) or the
     lease's expiry frees the blocks: unlease on every rank, then `release_kv` in the engine.
  4. A cancelled or timed-out `Prefill` aborts the request in the engine: nothing stays allocated,
     whichever step it was in (queued, prefilling, leasing). A ReleaseKV that overtakes its Prefill
     frees the blocks as soon as they are leased.

Errors: a request the engine refuses is INVALID_ARGUMENT (the engine goes on); a dead engine (a TP
rank died, a collective failed) is UNAVAILABLE at once, so the router retries on another replica.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass

import grpc
from pdserve.v1 import worker_pb2, worker_pb2_grpc

from engine.async_engine import AsyncEngine, RequestStream
from engine.engine import StepOutput
from engine.sampling import SamplingParams
from kv_transfer.handle import KVHandle, RankShard


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
    host_id: str = ""  # the rank's host (kv_transfer.base.HOST_ID), for decode's choice of source


# Every gRPC server of a worker: requests and answers above this size are refused (RESOURCE_EXHAUSTED)
# before they are parsed; a prompt of 128k tokens is well under 1 MiB on the wire.
MAX_MESSAGE_BYTES = 4 << 20
SERVER_OPTIONS = (
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
)

class LeaseLost(Exception):
    """The request was released while its lease was being set up (its blocks are already free)."""


class PrefillService(worker_pb2_grpc.PrefillWorkerServicer):
    def __init__(
        self,
        engine: AsyncEngine,
        ranks: Sequence[RankLease],
        lease_seconds: float,
        dtype: str,
    ) -> None:
        self.engine = engine
        self.ranks = list(ranks)
        self.lease_seconds = lease_seconds
        self.dtype = dtype
        self.leases: dict[str, tuple[asyncio.TimerHandle, int]] = {}  # request id -> (expiry timer, blocks)
        self.queued_prompt_tokens = 0
        self.running: set[str] = set()   # Prefill calls not answered yet
        self.unwanted: set[str] = set()  # released while still running: free the lease at once
        self.stream_chunk_blocks = 1  # PrefillStream: blocks per pull (the replica sets its chunk)
        self._token_key = secrets.token_bytes(32)  # lease tokens are derived from it (lease_token())

    def lease_token(self, rid: str) -> bytes:
        """The secret a puller must present for rid's KV: a keyed hash of the request id under this
        replica's random key (nothing to store; unguessable from outside)."""
        return hmac.new(self._token_key, rid.encode(), hashlib.sha256).digest()[:16]

    async def Prefill(  # noqa: N802 - gRPC method name
        self, request: worker_pb2.PrefillRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.PrefillResponse:
        rid = request.request_id
        arrived = time.perf_counter()
        rid, prompt, params = await self._accept(request, context)
        self.running.add(rid)
        try:
            out = await self._prefill(rid, prompt, params, context)
            try:
                handle = await self._lease(rid, len(prompt))
            except LeaseLost as lost:
                await context.abort(grpc.StatusCode.CANCELLED, str(lost))
            if rid in self.unwanted:  # a ReleaseKV overtook this call: the requester gave up
                await self.release(rid)
                await context.abort(grpc.StatusCode.CANCELLED, f"{rid} was released before its prefill ended")
        finally:
            self.running.discard(rid)
            self.unwanted.discard(rid)
        logprob = out.logprobs[0] if out.logprobs else 0.0
        return worker_pb2.PrefillResponse(
            request_id=rid, first_token=out.token_ids[0], first_logprob=logprob, kv=handle.to_proto(),
            prefill_seconds=time.perf_counter() - arrived,
        )

    async def _accept(self, request: worker_pb2.PrefillRequest, context: grpc.aio.ServicerContext
                      ) -> tuple[str, list[int], SamplingParams]:
        rid = request.request_id
        if not rid or rid in self.leases or rid in self.running:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"request_id {rid!r} is empty or in use")
        if self.engine.error is not None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"prefill engine failed: {self.engine.error!r}")
        try:
            params = SamplingParams.from_wire(request.sampling)
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        return rid, list(request.prompt_token_ids), params

    async def PrefillStream(  # noqa: N802 - gRPC method name
        self, request: worker_pb2.PrefillRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[worker_pb2.PrefillResponse]:
        """Streamed hand-off (prefill_worker/streaming.py): an early streamed KVHandle, then the
        first token. The KV source answers each chunk's pull once the engine computed it."""
        from prefill_worker.streaming import stream_prefill

        arrived = time.perf_counter()
        rid, prompt, params = await self._accept(request, context)
        self.running.add(rid)
        try:
            async for message in stream_prefill(self, rid, prompt, params, context):
                if not message.early:
                    message.prefill_seconds = time.perf_counter() - arrived
                yield message
        finally:
            self.running.discard(rid)
            self.unwanted.discard(rid)

    async def _prefill(self, rid: str, prompt: list[int], params: SamplingParams,
                       context: grpc.aio.ServicerContext) -> StepOutput:
        """The first token's output, or the call ends with a status (nothing left allocated)."""
        self.queued_prompt_tokens += len(prompt)
        try:
            stream, out = await self._run(rid, prompt, params)
        finally:
            self.queued_prompt_tokens -= len(prompt)
        if stream.error is not None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, stream.error)
        if out.finish_reason == "error":
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"prefill engine failed: {self.engine.error!r}")
        if out.finish_reason == "abort" or not out.token_ids:
            self.engine.abort(rid)
            await context.abort(grpc.StatusCode.INTERNAL, f"prefill of {rid} failed: {out.finish_reason}")
        return out

    async def _run(self, rid: str, prompt: list[int], params: SamplingParams) -> tuple[RequestStream, StepOutput]:
        stream = self.engine.submit(rid, prompt, params, hold_kv=True)
        try:
            out = await stream.next()
            while out.finish_reason is None:
                out = await stream.next()
            return stream, out
        except asyncio.CancelledError:
            self.engine.abort(rid)
            raise

    async def _lease(self, rid: str, num_tokens: int) -> KVHandle:
        """Leases the held blocks on every rank; on any failure or cancel, frees them instead."""
        inner = self.engine.engine
        loop = asyncio.get_running_loop()
        timer = loop.call_later(self.lease_seconds, lambda: asyncio.ensure_future(self.release(rid)))
        self.leases[rid] = (timer, 0)
        try:
            blocks = await self.engine.call(lambda: inner.kv_block_ids(rid))
            self._check_still_leased(rid, timer)
            self.leases[rid] = (timer, len(blocks))
            expiry = time.time() + self.lease_seconds
            token = self.lease_token(rid)
            await asyncio.gather(*(r.lease(rid, list(blocks), expiry, token) for r in self.ranks))
            self._check_still_leased(rid, timer)
        except BaseException:
            await asyncio.shield(self._drop_lease(rid, timer))
            raise
        cfg = inner.model_config
        return KVHandle(
            request_id=rid,
            num_tokens=num_tokens,
            block_size=inner.cache_config.block_size,
            num_layers=cfg.num_layers,
            num_kv_heads=cfg.num_kv_heads,
            head_dim=cfg.head_dim,
            dtype=self.dtype,
            tp_size=len(self.ranks),
            shards=tuple(RankShard(r.rank, r.endpoint, tuple(blocks), r.host_id) for r in self.ranks),
            lease_expiry=expiry,
            lease_token=token,
        )

    def _check_still_leased(self, rid: str, timer: asyncio.TimerHandle) -> None:
        """A ReleaseKV (or the lease timer) that ran while _lease awaited has already freed the
        blocks: writing the lease back then would leave it, and the ranks' leases, behind for good."""
        entry = self.leases.get(rid)
        if entry is None or entry[0] is not timer:
            raise LeaseLost(f"{rid} was released while its KV was being leased")

    async def _drop_lease(self, rid: str, timer: asyncio.TimerHandle) -> None:
        """_lease failed or lost a race (run shielded): free everything it may have leased."""
        entry = self.leases.get(rid)
        if entry is not None and entry[0] is timer:
            await self._release(rid)
        else:  # a release came first; its unlease may have run before the ranks' lease was written
            await self._free(rid)

    async def release(self, rid: str) -> bool:
        """Ends rid's lease and frees its blocks; runs to the end even when the caller is cancelled
        (a ReleaseKV whose deadline passes mid-way used to leave the blocks held with no lease)."""
        return await asyncio.shield(self._release(rid))

    async def _release(self, rid: str) -> bool:
        lease = self.leases.pop(rid, None)
        if lease is None:
            if rid in self.running:
                self.unwanted.add(rid)
            return False
        lease[0].cancel()
        await self._free(rid)
        return True

    async def _free(self, rid: str) -> None:
        """Unleases rid on every rank, then frees its held blocks."""
        await asyncio.gather(*(r.unlease(rid) for r in self.ranks), return_exceptions=True)
        self.engine.abort(rid)  # frees the held blocks; works on a dead engine too (a no-op)

    async def ReleaseKV(  # noqa: N802 - gRPC method name
        self, request: worker_pb2.ReleaseKVRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.ReleaseKVResponse:
        return worker_pb2.ReleaseKVResponse(released=await self.release(request.request_id))

    def leased_blocks(self) -> int:
        return sum(blocks for _, blocks in self.leases.values())
