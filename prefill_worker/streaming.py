"""PrefillStream: the prefill half of layer-wise (chunk-wise) KV streaming (kv_transfer.streaming).

Lifecycle of a request here:
  1. The prompt is submitted with hold_kv, as for Prefill.
  2. After every engine step (`next_change`; an `engine.call` runs between steps) the request's block table and
     computed tokens are read; every rank's KV source gets a *streamed lease*: the blocks so far and
     how many of them hold computed KV. The first time the request has blocks, the early event
     (early=true) carries a streamed KVHandle: no block ids, `stream_chunk_blocks` per pull.
  3. Decode pulls blocks by index, chunk by chunk; each source answers a chunk's pull once those
     blocks are computed, so a chunk travels while the next one is prefilled.
  4. When the first token is sampled, the lease covers every block and carries the token (the pull
     of the last chunk returns it); the last event carries the first token.
  5. Release, expiry, cancel and failures free the blocks as for Prefill (PrefillService.release).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import grpc
from pdserve.v1 import worker_pb2

from engine.engine import LLMEngine, StepOutput
from engine.sampling import SamplingParams
from kv_transfer.handle import KVHandle, RankShard

if TYPE_CHECKING:
    from prefill_worker.server import PrefillService

@dataclass(frozen=True, slots=True)
class Progress:
    """A request's KV on this replica: its block table so far and the blocks holding computed KV."""

    block_ids: tuple[int, ...]
    ready_blocks: int


def read_progress(engine: LLMEngine, rid: str) -> Progress | None:
    """Runs on the engine thread; None while the request has no blocks (queued, or gone)."""
    req = engine.requests.get(rid)
    if req is None or not req.block_table:
        return None
    bs = engine.cache_config.block_size
    last = -(-len(req.prompt_token_ids) // bs) - 1  # ready only with the first token (the final update)
    return Progress(tuple(req.block_table), min(req.num_computed_tokens // bs, last))


def streamed_handle(svc: PrefillService, rid: str, num_tokens: int, expiry: float) -> KVHandle:
    cfg, inner = svc.engine.engine.model_config, svc.engine.engine
    return KVHandle(
        request_id=rid, num_tokens=num_tokens, block_size=inner.cache_config.block_size,
        num_layers=cfg.num_layers, num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
        dtype=svc.dtype, tp_size=len(svc.ranks),
        shards=tuple(RankShard(r.rank, r.endpoint, (), r.host_id) for r in svc.ranks), lease_expiry=expiry,
        lease_token=svc.lease_token(rid),
    )


def early_message(svc: PrefillService, rid: str, num_tokens: int, expiry: float) -> worker_pb2.PrefillResponse:
    kv = streamed_handle(svc, rid, num_tokens, expiry).to_proto()
    kv.stream_chunk_blocks = svc.stream_chunk_blocks
    return worker_pb2.PrefillResponse(request_id=rid, kv=kv, early=True)


async def _update(svc: PrefillService, rid: str, progress: Progress, expiry: float,
                  first_token: int | None = None) -> None:
    blocks = list(progress.block_ids)
    token = svc.lease_token(rid)
    await asyncio.gather(*(r.stream_lease(rid, blocks, progress.ready_blocks, expiry, first_token, token)
                           for r in svc.ranks if r.stream_lease is not None))


def _open_lease(svc: PrefillService, rid: str, num_blocks: int) -> float:
    """Registers the lease (expiry timer, release()) and returns its expiry (unix seconds)."""
    loop = asyncio.get_running_loop()
    timer = loop.call_later(svc.lease_seconds, lambda: asyncio.ensure_future(svc.release(rid)))
    svc.leases[rid] = (timer, num_blocks)
    return time.time() + svc.lease_seconds


async def stream_prefill(svc: PrefillService, rid: str, prompt: list[int], params: SamplingParams,
                         context: grpc.aio.ServicerContext) -> AsyncIterator[worker_pb2.PrefillResponse]:
    """The events of one PrefillStream call (see the module docstring)."""
    if any(r.stream_lease is None for r in svc.ranks):
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "this replica cannot stream KV")
    inner = svc.engine.engine
    svc.queued_prompt_tokens += len(prompt)
    run = asyncio.ensure_future(svc._run(rid, prompt, params))
    expiry: float | None = None
    last: Progress | None = None
    try:
        while not run.done():
            stepped = svc.engine.next_change()
            progress = await svc.engine.call(lambda: read_progress(inner, rid))
            if progress is not None and progress != last:
                if expiry is None:
                    expiry = _open_lease(svc, rid, len(progress.block_ids))
                    if rid in svc.unwanted:
                        break
                    await _update(svc, rid, progress, expiry)
                    yield early_message(svc, rid, len(prompt), expiry)
                else:
                    await _update(svc, rid, progress, expiry)
                last = progress
            await asyncio.wait([stepped, run], return_when=asyncio.FIRST_COMPLETED)  # type: ignore[type-var]
        if rid in svc.unwanted:
            await context.abort(grpc.StatusCode.CANCELLED, f"{rid} was released before its prefill ended")
        stream, out = await run
        await _check_outcome(svc, rid, stream.error, out, context)
        blocks = tuple(await svc.engine.call(lambda: inner.kv_block_ids(rid)))
        early = expiry is None  # ended before a step showed its blocks (a prompt of one step)
        if expiry is None:
            expiry = _open_lease(svc, rid, len(blocks))
        if rid not in svc.leases:  # released meanwhile (ReleaseKV or expiry): the requester gave up
            await context.abort(grpc.StatusCode.CANCELLED, f"{rid} was released before its prefill ended")
        svc.leases[rid] = (svc.leases[rid][0], len(blocks))
        # Every rank knows the whole lease before decode can learn the handle and pull.
        await _update(svc, rid, Progress(blocks, len(blocks)), expiry, out.token_ids[0])
        if early:
            yield early_message(svc, rid, len(prompt), expiry)
        yield _final(svc, rid, len(prompt), expiry, out)
    except BaseException:
        run.cancel()
        svc.engine.abort(rid)
        await asyncio.shield(svc.release(rid))
        raise
    finally:
        svc.queued_prompt_tokens -= len(prompt)


async def _check_outcome(svc: PrefillService, rid: str, error: str | None, out: StepOutput,
                         context: grpc.aio.ServicerContext) -> None:
    if error is not None:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, error)
    if out.finish_reason == "error":
        await context.abort(grpc.StatusCode.UNAVAILABLE, f"prefill engine failed: {svc.engine.error!r}")
    if out.finish_reason == "abort" or not out.token_ids:
        await context.abort(grpc.StatusCode.INTERNAL, f"prefill of {rid} failed: {out.finish_reason}")


def _final(svc: PrefillService, rid: str, num_tokens: int, expiry: float,
           out: StepOutput) -> worker_pb2.PrefillResponse:
    message = early_message(svc, rid, num_tokens, expiry)
    message.early = False
    message.first_token = out.token_ids[0]
    message.first_logprob = out.logprobs[0] if out.logprobs else 0.0
    return message
