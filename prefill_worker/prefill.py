"""What Prefill and PrefillStream share: running a prompt to its first token with its blocks held,
judging how that ended, and describing the held KV in a KVHandle."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass

import grpc
from pdserve.v1 import worker_pb2

from engine.async_engine import AsyncEngine, RequestStream
from engine.engine import StepOutput
from engine.sampling import SamplingParams
from kv_transfer.handle import KVHandle, RankShard
from prefill_worker.lease import Lease, RankLease


@dataclass(frozen=True, slots=True)
class Job:
    """One prefill call: the lease it runs under and its prompt."""

    lease: Lease
    prompt: list[int]
    params: SamplingParams


@dataclass(frozen=True, slots=True)
class HandleSpec:
    """What every KVHandle of this replica says besides the request's own blocks."""

    ranks: tuple[RankLease, ...]
    dtype: str
    block_size: int
    num_layers: int
    num_kv_heads: int
    head_dim: int

    @classmethod
    def of(cls, engine: AsyncEngine, ranks: Sequence[RankLease], dtype: str) -> HandleSpec:
        model = engine.model_config
        return cls(tuple(ranks), dtype, engine.cache_config.block_size, model.num_layers,
                   model.num_kv_heads, model.head_dim)

    def handle(self, lease: Lease, num_tokens: int, blocks: tuple[int, ...]) -> KVHandle:
        """Every rank's endpoint and blocks (none: a streamed handle, pulled by index)."""
        return KVHandle(
            request_id=lease.rid, num_tokens=num_tokens, block_size=self.block_size,
            num_layers=self.num_layers, num_kv_heads=self.num_kv_heads, head_dim=self.head_dim,
            dtype=self.dtype, tp_size=len(self.ranks),
            shards=tuple(RankShard(r.rank, r.endpoint, blocks, r.host_id) for r in self.ranks),
            lease_expiry=lease.expiry, lease_token=lease.token,
        )


async def run_to_first_token(engine: AsyncEngine, job: Job) -> tuple[RequestStream, StepOutput]:
    """Submits the prompt with hold_kv and waits for its finishing output; a cancelled wait
    aborts the request in the engine."""
    rid = job.lease.rid
    stream = engine.submit(rid, job.prompt, job.params, hold_kv=True)
    try:
        out = await stream.next()
        while out.finish_reason is None:
            out = await stream.next()
        return stream, out
    except asyncio.CancelledError:
        engine.abort(rid)
        raise


async def check_outcome(engine: AsyncEngine, rid: str, stream: RequestStream, out: StepOutput,
                        context: grpc.aio.ServicerContext) -> None:
    """Ends the call with a status unless the prefill produced its first token."""
    if stream.error is not None:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, stream.error)
    if out.finish_reason == "error":
        await context.abort(grpc.StatusCode.UNAVAILABLE, f"prefill engine failed: {engine.error!r}")
    if out.finish_reason == "abort" or not out.token_ids:
        engine.abort(rid)
        await context.abort(grpc.StatusCode.INTERNAL, f"prefill of {rid} failed: {out.finish_reason}")


def first_token_fields(message: worker_pb2.PrefillResponse, out: StepOutput) -> worker_pb2.PrefillResponse:
    message.first_token = out.token_ids[0]
    message.first_logprob = out.logprobs[0] if out.logprobs else 0.0
    return message
