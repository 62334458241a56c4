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
from typing import Any

import grpc
from pdserve.v1 import router_pb2, worker_pb2

from router.admission import Admission, Overloaded
from router.config import RouterConfig
from router.errors import RouterError, unavailable, worker_error
from router.output import OutputState
from router.picker import AffinityMemory, pick_decode, pick_prefill
from router.prefix import hash_blocks
from router.registry import DECODE, PREFILL, Registry, Replica
from router.tokenizer import TextCodec
from router.validate import Prepared

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
        ticket = deps.admission.admit(len(prep.prompt_ids))
    except Overloaded as e:
        raise RouterError(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e)) from None
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


async def _prefill(prep: Prepared, deps: FlowDeps, remaining: Remaining,
                   lease: Lease) -> tuple[Replica, worker_pb2.PrefillResponse]:
    """Prefill on the best replica; on UNAVAILABLE, on another one (config.worker_retries times)."""
    hashes = hash_blocks(prep.prompt_ids, deps.config.block_size, deps.config.affinity_blocks)
    request = worker_pb2.PrefillRequest(
        request_id=prep.request_id, prompt_token_ids=prep.prompt_ids, sampling=prep.sampling
    )
    tried: set[str] = set()
    for attempt in range(deps.config.worker_retries + 1):
        ready = [r for r in deps.registry.ready(PREFILL) if r.replica_id not in tried]
        replica = pick_prefill(ready, hashes, deps.memory, deps.config.affinity_max_imbalance_tokens)
        if replica is None:
            raise unavailable("prefill")
        tried.add(replica.replica_id)
        try:
            response = await _call_prefill(replica, request, remaining, lease)
        except grpc.aio.AioRpcError as e:
            if e.code() == grpc.StatusCode.UNAVAILABLE and attempt < deps.config.worker_retries:
                continue
            raise worker_error("prefill", replica.replica_id, e) from None
        deps.memory.record(hashes, replica.replica_id)
        return replica, response
    raise unavailable("prefill")


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
    """Decode on the best replica; before its first message, UNAVAILABLE moves to another one."""
    request = worker_pb2.DecodeRequest(
        request_id=prep.request_id, prompt_token_ids=prep.prompt_ids, first_token=first.first_token,
        sampling=prep.sampling, kv=first.kv, prefill_address=prefill_replica.address,
    )
    tried: set[str] = set()
    for attempt in range(deps.config.worker_retries + 1):
        ready = [r for r in deps.registry.ready(DECODE) if r.replica_id not in tried]
        replica = pick_decode(ready)
        if replica is None:
            raise unavailable("decode")
        tried.add(replica.replica_id)
        try:
            await _stream_decode(replica, request, _blocks_needed(prep, deps.config.block_size),
                                 out, write, remaining, lease)
            return
        except grpc.aio.AioRpcError as e:
            retry = lease.replica is not None and attempt < deps.config.worker_retries
            if e.code() == grpc.StatusCode.UNAVAILABLE and retry:
                continue
            raise worker_error("decode", replica.replica_id, e) from None


async def _stream_decode(replica: Replica, request: worker_pb2.DecodeRequest, blocks: int,
                         out: OutputState, write: Write, remaining: Remaining, lease: Lease) -> None:
    replica.reserved_blocks += blocks
    replica.open_streams += 1
    call = replica.decode.Decode(request, timeout=_timeout(remaining))
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
