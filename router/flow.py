"""One Generate request, after validation: admit -> prefill -> first token -> decode -> stream.

Lifecycle and who frees what:
  1. admit (RESOURCE_EXHAUSTED at once when full); the ticket is returned on every exit.
  2. Prefill on the picked replica, with the client's remaining deadline. From the moment the call
     is sent the replica may hold a KV lease for the request ("the lease is ours").
  3. The first token goes to the client at once. If it already ends the request, the lease is
     released (ReleaseKV) and the call ends.
  4. Decode on the picked replica. Its first message means it pulled the KV and released the lease
     itself ("the lease is decode's").
  5. On any exit while the lease is ours (cancel, deadline, error, early finish) the router sends
     ReleaseKV in the background. Cancelling a worker call (asyncio cancellation reaches the gRPC
     call) makes the worker abort the request and free its blocks.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
from pdserve.v1 import router_pb2, worker_pb2

from router.admission import Admission, DuplicateRequest, Overloaded
from router.config import RouterConfig
from router.errors import RouterError, unavailable, worker_error
from router.output import OutputState
from router.picker import AffinityMemory, pick_decode, pick_prefill
from router.prefix import hash_blocks
from router.registry import DECODE, PREFILL, Registry, Replica
from router.tokenizer import TextCodec
from router.validate import Prepared

# Worker answers after which the request moves to another replica (before anything streamed):
# the replica is gone, or it has no room (decode: before pulling, so the KV lease still holds).
RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED})
T = TypeVar("T")
Write = Callable[[router_pb2.GenerateResponse], Awaitable[None]]
Remaining = Callable[[], float | None]


@dataclass(frozen=True, slots=True)
class FlowDeps:
    """What a request needs from the server; `spawn` runs a coroutine in the background."""

    config: RouterConfig
    registry: Registry
    admission: Admission
    memory: AffinityMemory
    codec: TextCodec | None
    spawn: Callable[[Coroutine[Any, Any, None]], None]


@dataclass(slots=True)
class Lease:
    replica: Replica | None = None  # the prefill replica that may hold our KV; None = not ours


def _timeout(remaining: Remaining) -> float | None:
    left = remaining()
    if left is not None and left <= 0:
        raise RouterError(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded")
    return left


async def run_request(prep: Prepared, deps: FlowDeps, write: Write, remaining: Remaining) -> None:
    """Streams the request's messages through `write`. Raises RouterError for a status to return."""
    try:
        ticket = deps.admission.admit(prep.request_id, len(prep.prompt_ids))
    except Overloaded as e:
        raise RouterError(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e)) from None
    except DuplicateRequest as e:
        raise RouterError(grpc.StatusCode.ALREADY_EXISTS, str(e)) from None
    lease = Lease()
    try:
        prefill_replica, first = await _prefill(prep, deps, remaining, lease)
        ticket.prefill_done()
        out = OutputState(prep, deps.codec, deps.config.eos_token_ids)
        await write(out.accept([first.first_token], [first.first_logprob]))
        if not out.finished:
            await _decode(prep, first, prefill_replica, out, deps, write, remaining, lease)
    finally:
        ticket.close()
        if lease.replica is not None:
            deps.spawn(_release(lease.replica, prep.request_id, deps.config.release_timeout_seconds))


async def _release(replica: Replica, request_id: str, timeout: float) -> None:
    try:
        await replica.prefill.ReleaseKV(worker_pb2.ReleaseKVRequest(request_id=request_id), timeout=timeout)
    except grpc.aio.AioRpcError:
        pass  # the replica is gone or busy: the lease expires on its own


async def _with_retries(stage: str, pick: Callable[[set[str]], Replica | None],
                        attempt: Callable[[Replica], Awaitable[T]], may_retry: Callable[[], bool],
                        retries: int) -> tuple[Replica, T]:
    """attempt(best replica); after a RETRYABLE error, the next best one (at most `retries` more)."""
    tried: set[str] = set()
    last: RouterError | None = None
    for _ in range(retries + 1):
        replica = pick(tried)
        if replica is None:
            break
        tried.add(replica.replica_id)
        try:
            return replica, await attempt(replica)
        except grpc.aio.AioRpcError as e:
            last = worker_error(stage, replica.replica_id, e)
            if e.code() not in RETRYABLE or not may_retry():
                raise last from None
    raise last or unavailable(stage)


async def _prefill(prep: Prepared, deps: FlowDeps, remaining: Remaining,
                   lease: Lease) -> tuple[Replica, worker_pb2.PrefillResponse]:
    cfg = deps.config
    hashes = hash_blocks(prep.prompt_ids, cfg.block_size, cfg.affinity_blocks)
    request = worker_pb2.PrefillRequest(
        request_id=prep.request_id, prompt_token_ids=prep.prompt_ids, sampling=prep.sampling
    )

    def pick(tried: set[str]) -> Replica | None:
        ready = [r for r in deps.registry.ready(PREFILL) if r.replica_id not in tried]
        return pick_prefill(ready, hashes, deps.memory, cfg.affinity_max_imbalance_tokens)

    replica, response = await _with_retries(
        "prefill", pick, lambda r: _call_prefill(r, request, remaining, lease), lambda: True,
        cfg.worker_retries,
    )
    deps.memory.record(hashes, replica.replica_id)
    return replica, response


async def _call_prefill(replica: Replica, request: worker_pb2.PrefillRequest, remaining: Remaining,
                        lease: Lease) -> worker_pb2.PrefillResponse:
    n = len(request.prompt_token_ids)
    replica.outstanding_prompt_tokens += n
    lease.replica = replica
    try:
        response: worker_pb2.PrefillResponse = await replica.prefill.Prefill(request, timeout=_timeout(remaining))
        return response
    except grpc.aio.AioRpcError as e:
        if e.code() not in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED):
            lease.replica = None  # the worker failed the call: it holds nothing
        raise
    finally:
        replica.outstanding_prompt_tokens -= n


def _blocks_needed(prep: Prepared, block_size: int) -> int:
    return -(-(len(prep.prompt_ids) + prep.sampling.max_tokens) // block_size)


async def _decode(prep: Prepared, first: worker_pb2.PrefillResponse, prefill_replica: Replica,
                  out: OutputState, deps: FlowDeps, write: Write, remaining: Remaining,
                  lease: Lease) -> None:
    """Decode on the best replica; before its first message a RETRYABLE error moves it to another."""
    request = worker_pb2.DecodeRequest(
        request_id=prep.request_id, prompt_token_ids=prep.prompt_ids, first_token=first.first_token,
        sampling=prep.sampling, kv=first.kv, prefill_address=prefill_replica.address,
    )
    blocks = _blocks_needed(prep, deps.config.block_size)

    def pick(tried: set[str]) -> Replica | None:
        return pick_decode([r for r in deps.registry.ready(DECODE) if r.replica_id not in tried])

    await _with_retries(
        "decode", pick, lambda r: _stream_decode(r, request, blocks, out, write, remaining, lease),
        lambda: lease.replica is not None,  # nothing streamed yet: the KV is still leased
        deps.config.worker_retries,
    )


async def _stream_decode(replica: Replica, request: worker_pb2.DecodeRequest, blocks: int,
                         out: OutputState, write: Write, remaining: Remaining, lease: Lease) -> None:
    call = replica.decode.Decode(request, timeout=_timeout(remaining))
    replica.reserved_blocks += blocks
    replica.open_streams += 1
    worker_done = False
    try:
        async for response in call:
            worker_done = response.finish_reason != worker_pb2.FINISH_NONE
            if lease.replica is not None:  # decode has pulled the KV and released the lease
                lease.replica = None
                replica.reserved_blocks -= blocks
                blocks = 0
            await write(out.accept(response.token_ids, response.logprobs, response.finish_reason))
            if out.finished:
                return
        raise RouterError(grpc.StatusCode.INTERNAL,
                          f"decode replica {replica.replica_id}: stream ended without a finish reason")
    finally:
        if not worker_done:
            call.cancel()  # the router finished first, or is cancelled: the worker aborts the request
        replica.reserved_blocks -= blocks
        replica.open_streams -= 1
