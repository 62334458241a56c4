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

Failures (router.migration on): a prefill replica that fails UNAVAILABLE is replaced (retried on
another one). A decode replica that dies (UNAVAILABLE, or forgotten by the registry while the call
waits) is replaced by *migration*: the prompt plus every token already sent to the client is
prefilled again (worker request id `<id>/m<n>`), the new first token continues the stream, and decode
resumes on another replica; the client sees no gap in its tokens and no duplicate. With migration off,
or no replica left, the request ends UNAVAILABLE. Every wait on a worker is bounded: a call to a
replica the registry forgot (silent for 3 heartbeats) is abandoned.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc
from pdserve.v1 import router_pb2, worker_pb2

from router.admission import Admission, DuplicateRequest, Overloaded
from router.config import RouterConfig
from router.errors import RouterError, unavailable, worker_error
from router.local import is_local_kv, pick_colocated, pick_local_prefill, pick_same_replica
from router.observe import RequestClock, RequestObserver
from router.output import OutputState
from router.picker import AffinityMemory, pick_decode, pick_prefill
from router.prefix import hash_blocks
from router.registry import DECODE, PREFILL, Registry, Replica
from router.tokenizer import TextCodec
from router.validate import Prepared

# Worker answers after which the request moves to another replica: the replica is gone, or it has
# no room (decode: before pulling, so the KV lease still holds).
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
    observer: RequestObserver | None = None  # TTFT / ITL / TPOT (deploy/metrics.py)


@dataclass(slots=True)
class Lease:
    replica: Replica | None = None  # the prefill replica that may hold our KV; None = not ours
    request_id: str = ""            # the id the workers know the current attempt by


@dataclass(slots=True)
class Sent:
    """What the client has received: the stream continues after these tokens on a migration."""

    out: OutputState
    write: Write
    tokens: list[int] = field(default_factory=list)

    async def emit(self, token_ids: Sequence[int], logprobs: Sequence[float],
                   finish: int = worker_pb2.FINISH_NONE) -> None:
        msg = self.out.accept(token_ids, logprobs, finish)
        self.tokens.extend(msg.token_ids)
        await self.write(msg)


class ReplicaLost(Exception):
    """The registry forgot the replica while a call to it was waiting (silent, likely dead)."""


class Failed(Exception):
    """A worker call failed: `code` is the worker's status, `error` what the client would see."""

    def __init__(self, code: grpc.StatusCode, error: RouterError) -> None:
        super().__init__(error.message)
        self.code = code
        self.error = error


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
    lease, clock = Lease(request_id=prep.request_id), RequestClock(deps.observer)
    try:
        if deps.config.kv_streaming:
            from router.streaming import run_streamed  # it builds on this module

            if await run_streamed(prep, deps, write, remaining, lease, clock, ticket):
                return
        prefill_replica, first = await _prefill(prep, prep.prompt_ids, prep.sampling, deps, remaining, lease)
        ticket.prefill_done()
        sent = Sent(OutputState(prep, deps.codec, deps.config.eos_token_ids), write)
        await sent.emit([first.first_token], [first.first_logprob])
        clock.first_token(prefill_replica.replica_id)
        if not sent.out.finished:
            await _decode(prep, first, prefill_replica, sent, deps, remaining, lease, clock)
    finally:
        ticket.close()
        _give_back(lease, deps)


def _give_back(lease: Lease, deps: FlowDeps) -> None:
    """Releases the KV lease in the background when it is still ours."""
    if lease.replica is not None:
        deps.spawn(_release(lease.replica, lease.request_id, deps.config.release_timeout_seconds))
        lease.replica = None


async def _release(replica: Replica, request_id: str, timeout: float) -> None:
    try:
        await replica.prefill.ReleaseKV(worker_pb2.ReleaseKVRequest(request_id=request_id), timeout=timeout)
    except grpc.aio.AioRpcError:
        pass  # the replica is gone or busy: the lease expires on its own


async def _watched(replica: Replica, deps: FlowDeps, aw: Awaitable[T]) -> T:
    """Awaits a call to `replica`; raises ReplicaLost once the registry forgets the replica (a peer
    that died without closing its connection would otherwise hold the call until its deadline)."""
    task = asyncio.ensure_future(aw)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=deps.config.heartbeat_seconds)
            if done:
                return task.result()
            if deps.registry.get(replica.replica_id) is not replica:
                raise ReplicaLost(f"replica {replica.replica_id} stopped heartbeating")
    finally:
        if not task.done():
            task.cancel()


def _failed(stage: str, replica: Replica, exc: Exception) -> Failed:
    if isinstance(exc, grpc.aio.AioRpcError):
        return Failed(exc.code(), worker_error(stage, replica.replica_id, exc))
    message = f"{stage} replica {replica.replica_id}: UNAVAILABLE: {exc}"
    return Failed(grpc.StatusCode.UNAVAILABLE, RouterError(grpc.StatusCode.UNAVAILABLE, message))


async def _prefill(prep: Prepared, prompt: Sequence[int], sampling: worker_pb2.WorkerSampling,
                   deps: FlowDeps, remaining: Remaining,
                   lease: Lease) -> tuple[Replica, worker_pb2.PrefillResponse]:
    """Prefill on the best replica; after a RETRYABLE failure, on the next best (worker_retries more)."""
    cfg = deps.config
    hashes = hash_blocks(prompt, cfg.block_size, cfg.affinity_blocks)
    request = worker_pb2.PrefillRequest(request_id=lease.request_id, prompt_token_ids=prompt, sampling=sampling)
    tried: set[str] = set()
    last: RouterError | None = None
    for _ in range(cfg.worker_retries + 1):
        ready = [r for r in deps.registry.ready(PREFILL) if r.replica_id not in tried]
        decoders = deps.registry.ready(DECODE)
        replica = (pick_local_prefill([r for r in decoders if r.replica_id not in tried], prompt, cfg)
                   or pick_colocated(ready, decoders, cfg.affinity_max_imbalance_tokens)
                   or pick_prefill(ready, hashes, deps.memory, cfg.affinity_max_imbalance_tokens))
        if replica is None:
            break
        tried.add(replica.replica_id)
        try:
            response = await _call_prefill(replica, request, deps, remaining, lease)
        except Failed as f:
            last = f.error
            if f.code not in RETRYABLE:
                raise last from None
            continue
        deps.memory.record(hashes, replica.replica_id)
        return replica, response
    raise last or unavailable("prefill")


async def _call_prefill(replica: Replica, request: worker_pb2.PrefillRequest, deps: FlowDeps,
                        remaining: Remaining, lease: Lease) -> worker_pb2.PrefillResponse:
    n = len(request.prompt_token_ids)
    replica.outstanding_prompt_tokens += n
    lease.replica = replica
    try:
        call = replica.prefill.Prefill(request, timeout=_timeout(remaining))
        response: worker_pb2.PrefillResponse = await _watched(replica, deps, call)
        return response
    except (grpc.aio.AioRpcError, ReplicaLost) as e:
        failed = _failed("prefill", replica, e)
        if failed.code not in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED):
            lease.replica = None  # the worker failed the call (or is gone): it holds nothing for us
        raise failed from None
    finally:
        replica.outstanding_prompt_tokens -= n


def _blocks_needed(num_tokens: int, max_tokens: int, block_size: int) -> int:
    return -(-(num_tokens + max_tokens) // block_size)


def _decode_request(lease: Lease, prompt: Sequence[int], first: worker_pb2.PrefillResponse,
                    sampling: worker_pb2.WorkerSampling, prefill: Replica) -> worker_pb2.DecodeRequest:
    return worker_pb2.DecodeRequest(
        request_id=lease.request_id, prompt_token_ids=prompt, first_token=first.first_token,
        sampling=sampling, kv=first.kv, prefill_address=prefill.address,
    )


async def _decode(prep: Prepared, first: worker_pb2.PrefillResponse, prefill_replica: Replica, sent: Sent,
                  deps: FlowDeps, remaining: Remaining, lease: Lease, clock: RequestClock,
                  failed: set[str] | None = None) -> None:
    """Decode on the best replica (not one of `failed`). Before its first message, RESOURCE_EXHAUSTED
    moves the request to another replica with the same KV lease; a replica that dies is replaced by a
    migration."""
    cfg = deps.config
    request = _decode_request(lease, prep.prompt_ids, first, prep.sampling, prefill_replica)
    failed = set(failed or ())
    last: RouterError | None = None
    for attempt in range(cfg.worker_retries + 1):
        replica = pick_decode([r for r in deps.registry.ready(DECODE) if r.replica_id not in failed])
        if replica is None:
            break
        if attempt and lease.replica is None:  # the KV lease is gone: prefill what was sent again
            request = await _migrate(prep, sent, deps, remaining, lease, attempt)
            if sent.out.finished:
                return
        if is_local_kv(request.kv):  # the KV stays in the engine that prefilled it: decode there
            replica = pick_same_replica(deps.registry.ready(DECODE), request.prefill_address)
            if replica is None:
                break
        blocks = _blocks_needed(len(request.prompt_token_ids), request.sampling.max_tokens, cfg.block_size)
        try:
            await _stream_decode(replica, request, blocks, sent, deps, remaining, lease, clock)
            return
        except Failed as f:
            failed.add(replica.replica_id)
            last = f.error
            if f.code not in RETRYABLE:
                raise last from None
            if f.code == grpc.StatusCode.RESOURCE_EXHAUSTED and lease.replica is not None:
                continue  # refused before pulling: the lease still holds the KV
            if not cfg.migration:
                if lease.replica is None:
                    raise last from None  # tokens were streamed: without migration, give up
                continue  # before its first message: another replica may still pull the lease
            _give_back(lease, deps)
    raise last or unavailable("decode")


async def _migrate(prep: Prepared, sent: Sent, deps: FlowDeps, remaining: Remaining, lease: Lease,
                   n: int) -> worker_pb2.DecodeRequest:
    """Prefills prompt + sent tokens under a new worker request id; streams the new first token."""
    lease.request_id = f"{prep.request_id}/m{n}"
    prompt = list(prep.prompt_ids) + sent.tokens
    sampling = worker_pb2.WorkerSampling()
    sampling.CopyFrom(prep.sampling)
    sampling.max_tokens = prep.sampling.max_tokens - len(sent.tokens)
    replica, first = await _prefill(prep, prompt, sampling, deps, remaining, lease)
    await sent.emit([first.first_token], [first.first_logprob])
    return _decode_request(lease, prompt, first, sampling, replica)


async def _stream_decode(replica: Replica, request: worker_pb2.DecodeRequest, blocks: int, sent: Sent,
                         deps: FlowDeps, remaining: Remaining, lease: Lease, clock: RequestClock,
                         call: Any = None) -> None:
    """Forwards the decode stream (`call`: one already opened with request, router/streaming.py)."""
    if call is None:
        call = replica.decode.Decode(request, timeout=_timeout(remaining))
    replica.reserved_blocks += blocks
    replica.open_streams += 1
    worker_done = False
    try:
        while True:
            try:
                response = await _watched(replica, deps, call.read())
            except (grpc.aio.AioRpcError, ReplicaLost) as e:
                raise _failed("decode", replica, e) from None
            if response is grpc.aio.EOF:
                break
            worker_done = response.finish_reason != worker_pb2.FINISH_NONE
            if lease.replica is not None:  # decode has pulled the KV and released the lease
                lease.replica = None
                replica.reserved_blocks -= blocks
                blocks = 0
            await sent.emit(response.token_ids, response.logprobs, response.finish_reason)
            clock.tokens(replica.replica_id, len(response.token_ids))
            if sent.out.finished:
                clock.finished(replica.replica_id)
                return
        raise RouterError(grpc.StatusCode.INTERNAL,
                          f"decode replica {replica.replica_id}: stream ended without a finish reason")
    finally:
        if not worker_done:
            call.cancel()  # the router finished first, or is cancelled: the worker aborts the request
        replica.reserved_blocks -= blocks
        replica.open_streams -= 1
