"""PrefillStream: the prefill half of layer-wise (chunk-wise) KV streaming (kv_transfer.streaming).

Lifecycle of a request here:
  1. The prompt is submitted with hold_kv, as for Prefill.
  2. After every engine step (`next_change`) the request's progress (block table, blocks holding
     computed KV) is read; the first time it has blocks, its lease opens STREAMING and every rank's
     KV source gets a *streamed lease*: the blocks so far and how many hold computed KV. Only then
     does the early event (early=true) carry a streamed KVHandle: no block ids,
     `stream_chunk_blocks` per pull. Each later step updates every rank the same way.
  3. Decode pulls blocks by index, chunk by chunk; each source answers a chunk's pull once those
     blocks are computed, so a chunk travels while the next one is prefilled.
  4. When the first token is sampled, the lease covers every block and carries the token (the pull
     of the last chunk returns it) on every rank; then the last event carries the first token.
  5. Release, expiry, cancel and failures end the lease as for Prefill (prefill_worker/lease.py);
     a release that lands mid-way ends the call with CANCELLED.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
from pdserve.v1 import worker_pb2

from engine.async_engine import AsyncEngine, PrefillProgress
from prefill_worker.lease import Lease, LeaseLost, LeaseState
from prefill_worker.prefill import (
    HandleSpec,
    Job,
    check_outcome,
    first_token_fields,
    run_to_first_token,
)


def early_message(spec: HandleSpec, lease: Lease, num_tokens: int, chunk_blocks: int) -> worker_pb2.PrefillResponse:
    kv = spec.handle(lease, num_tokens, ()).to_proto()
    kv.stream_chunk_blocks = chunk_blocks
    return worker_pb2.PrefillResponse(request_id=lease.rid, kv=kv, early=True)


async def stream_prefill(engine: AsyncEngine, spec: HandleSpec, job: Job, context: grpc.aio.ServicerContext,
                         *, seconds: float, chunk_blocks: int) -> AsyncIterator[worker_pb2.PrefillResponse]:
    """The events of one PrefillStream call (see the module docstring); seconds: the lease's."""
    if any(r.stream_lease is None for r in spec.ranks):
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "this replica cannot stream KV")
    lease, num_tokens = job.lease, len(job.prompt)
    run = asyncio.ensure_future(run_to_first_token(engine, job))
    try:
        last: PrefillProgress | None = None
        while not run.done() and not lease.unwanted:
            stepped = engine.next_change()
            progress = await engine.prefill_progress(lease.rid)
            if progress is not None and progress != last and not lease.unwanted:
                if lease.state is LeaseState.RUNNING:
                    lease.open(seconds, len(progress.block_ids), streamed=True)
                    await lease.stream(progress.block_ids, progress.ready_blocks)
                    yield early_message(spec, lease, num_tokens, chunk_blocks)
                else:
                    await lease.stream(progress.block_ids, progress.ready_blocks)
                last = progress
            await asyncio.wait([stepped, run], return_when=asyncio.FIRST_COMPLETED)  # type: ignore[type-var]
        if lease.unwanted:
            raise LeaseLost(f"{lease.rid} was released before its prefill ended")
        stream, out = await run
        await check_outcome(engine, lease.rid, stream, out, context)
        blocks = tuple(await engine.kv_block_ids(lease.rid))
        early = lease.state is LeaseState.RUNNING  # ended before a step showed its blocks
        if early:
            lease.open(seconds, len(blocks), streamed=True)
        # Every rank knows the whole lease before decode can learn the handle and pull.
        await lease.stream(blocks, len(blocks), out.token_ids[0])
        if early:
            yield early_message(spec, lease, num_tokens, chunk_blocks)
        final = early_message(spec, lease, num_tokens, chunk_blocks)
        final.early = False
        yield first_token_fields(final, out)
    except LeaseLost:
        run.cancel()
        await lease.drop()
        await context.abort(grpc.StatusCode.CANCELLED, f"{lease.rid} was released before its prefill ended")
    except BaseException:
        run.cancel()
        await lease.drop()
        raise
