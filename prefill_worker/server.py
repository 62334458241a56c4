"""The prefill replica's gRPC service.

Lifecycle of a request here:
  1. `Prefill` submits the prompt to the engine with hold_kv: the engine runs it in chunks on the TP
     group, samples the first token and keeps the prompt's blocks.
  2. The blocks are leased on every rank's KV source until `lease_seconds` from now, and the reply
     carries the first token and a KVHandle naming every rank's endpoint and block ids.
  3. `ReleaseKV` (from the decode replica once it pulled, or the router when it gives up) or the
     lease's expiry frees the blocks: unlease on every rank, then abort in the engine. The lease
     of each request is one state machine (prefill_worker/lease.py).
  4. A cancelled or timed-out `Prefill` aborts the request in the engine: nothing stays allocated,
     whichever step it was in (queued, prefilling, leasing). A ReleaseKV that overtakes its Prefill
     frees the blocks as soon as they are leased.

Errors: a request the engine refuses is INVALID_ARGUMENT (the engine goes on); a dead engine (a TP
rank died, a collective failed) is UNAVAILABLE at once, so the router retries on another replica.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections.abc import AsyncIterator, Sequence

import grpc
from pdserve.v1 import worker_pb2, worker_pb2_grpc

from engine.async_engine import AsyncEngine
from engine.engine import StepOutput
from engine.sampling import SamplingParams
from kv_transfer.handle import KVHandle
from prefill_worker.lease import Lease, LeaseLost, Leases, RankLease
from prefill_worker.prefill import (
    HandleSpec,
    Job,
    check_outcome,
    first_token_fields,
    run_to_first_token,
)
from prefill_worker.streaming import stream_prefill

# Every gRPC server of a worker: requests and answers above this size are refused (RESOURCE_EXHAUSTED)
# before they are parsed; a prompt of 128k tokens is well under 1 MiB on the wire.
MAX_MESSAGE_BYTES = 4 << 20
SERVER_OPTIONS = (
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
)


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
        self.leases = Leases(ranks, engine.abort)
        self.spec = HandleSpec.of(engine, ranks, dtype)
        self.queued_prompt_tokens = 0
        self.stream_chunk_blocks = 1  # PrefillStream: blocks per pull (the replica sets its chunk)
        self._token_key = secrets.token_bytes(32)  # lease tokens are derived from it (lease_token())

    @property
    def running(self) -> frozenset[str]:
        """Prefill calls not answered yet (diagnostics)."""
        return self.leases.running()

    @property
    def unwanted(self) -> frozenset[str]:
        """Released while still running: freed as their call ends (diagnostics)."""
        return self.leases.unwanted()

    def lease_token(self, rid: str) -> bytes:
        """The secret a puller must present for rid's KV: a keyed hash of the request id under this
        replica's random key (nothing to store; unguessable from outside)."""
        return hmac.new(self._token_key, rid.encode(), hashlib.sha256).digest()[:16]

    async def Prefill(  # noqa: N802 - gRPC method name
        self, request: worker_pb2.PrefillRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.PrefillResponse:
        arrived = time.perf_counter()
        job = await self._accept(request, context)
        lease = job.lease
        try:
            out = await self._prefill(job, context)
            handle = await self._lease(lease, len(job.prompt), context)
            if lease.unwanted:  # a ReleaseKV overtook this call: the requester gave up
                await self.release(lease.rid)
                await context.abort(grpc.StatusCode.CANCELLED, f"{lease.rid} was released before its prefill ended")
        finally:
            self.leases.answered(lease)
        message = worker_pb2.PrefillResponse(request_id=lease.rid, kv=handle.to_proto(),
                                             prefill_seconds=time.perf_counter() - arrived)
        return first_token_fields(message, out)

    async def _accept(self, request: worker_pb2.PrefillRequest, context: grpc.aio.ServicerContext) -> Job:
        """The call's job, its lease begun (RUNNING), or the call ends with a status."""
        rid = request.request_id
        if not rid or self.leases.in_use(rid):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"request_id {rid!r} is empty or in use")
        if self.engine.error is not None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"prefill engine failed: {self.engine.error!r}")
        try:
            params = SamplingParams.from_wire(request.sampling)
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        lease = self.leases.begin(rid, self.lease_token(rid))
        return Job(lease, list(request.prompt_token_ids), params)

    async def PrefillStream(  # noqa: N802 - gRPC method name
        self, request: worker_pb2.PrefillRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[worker_pb2.PrefillResponse]:
        """Streamed hand-off (prefill_worker/streaming.py): an early streamed KVHandle, then the
        first token. The KV source answers each chunk's pull once the engine computed it."""
        arrived = time.perf_counter()
        job = await self._accept(request, context)
        self.queued_prompt_tokens += len(job.prompt)
        try:
            events = stream_prefill(self.engine, self.spec, job, context, seconds=self.lease_seconds,
                                    chunk_blocks=self.stream_chunk_blocks)
            async for message in events:
                if not message.early:
                    message.prefill_seconds = time.perf_counter() - arrived
                yield message
        finally:
            self.queued_prompt_tokens -= len(job.prompt)
            self.leases.answered(job.lease)

    async def _prefill(self, job: Job, context: grpc.aio.ServicerContext) -> StepOutput:
        """The first token's output, or the call ends with a status (nothing left allocated)."""
        self.queued_prompt_tokens += len(job.prompt)
        try:
            stream, out = await run_to_first_token(self.engine, job)
        finally:
            self.queued_prompt_tokens -= len(job.prompt)
        await check_outcome(self.engine, job.lease.rid, stream, out, context)
        return out

    async def _lease(self, lease: Lease, num_tokens: int, context: grpc.aio.ServicerContext) -> KVHandle:
        """Leases the held blocks on every rank; on any failure or cancel, frees them instead."""
        lease.open(self.lease_seconds, 0)
        try:
            blocks = tuple(await self.engine.kv_block_ids(lease.rid))
            await lease.grant(blocks)
        except LeaseLost as lost:  # a ReleaseKV or the timer ran meanwhile
            await lease.drop()
            await context.abort(grpc.StatusCode.CANCELLED, str(lost))
        except BaseException:
            await lease.drop()
            raise
        return self.spec.handle(lease, num_tokens, blocks)

    async def release(self, rid: str) -> bool:
        """Ends rid's lease and frees its blocks; runs to the end even when the caller is cancelled."""
        return await self.leases.release(rid)

    async def ReleaseKV(  # noqa: N802 - gRPC method name
        self, request: worker_pb2.ReleaseKVRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.ReleaseKVResponse:
        return worker_pb2.ReleaseKVResponse(released=await self.release(request.request_id))

    def leased_blocks(self) -> int:
        return self.leases.leased_blocks()
