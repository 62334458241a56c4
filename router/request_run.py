"""One Generate request in flight: a RequestRun owns everything the request holds while it runs.

It carries the prepared request, the server's deps, what the client has received (`Sent`: the
writer, the output state, the tokens sent), the deadline, the KV lease, the clock and the admission
ticket. The plain path (router/flow.py) and the streamed KV path (router/streaming.py) are two uses
of its public methods: `prefill` -> `first_token` -> `decode`, or a streamed prefill whose open
decode call goes to `stream_decode` and, after a retryable failure, to `decode`.

The lease: from the moment a Prefill is sent, the replica may hold a KV lease for the request
(`lease.replica` set: "the lease is ours"). A decode stream's first message means decode pulled the
KV and released the lease itself ("the lease is decode's"). While the lease is ours, `give_back`
sends ReleaseKV in the background (cancel, deadline, error, early finish). Cancelling a worker call
(asyncio cancellation reaches the gRPC call) makes the worker abort the request and free its blocks.

Failures (router.migration on): a prefill replica that fails UNAVAILABLE is replaced (retried on
another one). A decode replica that dies (UNAVAILABLE, or forgotten by the registry while the call
waits) is replaced by *migration*: the prompt plus every token already sent to the client is
prefilled again (worker request id `<id>/m<n>`), the new first token continues the stream, and decode
resumes on another replica; the client sees no gap in its tokens and no duplicate. With migration off,
or no replica left, the request ends UNAVAILABLE.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc
from pdserve.v1 import router_pb2, worker_pb2

from router.admission import Admission, Ticket
from router.calls import (
    RETRYABLE,
    Failed,
    ReplicaLost,
    blocks_needed,
    call_failed,
    release_kv,
    watched,
)
from router.config import RouterConfig
from router.errors import RouterError, unavailable
from router.observe import RequestClock, RequestObserver
from router.output import OutputState
from router.picker import (
    AffinityMemory,
    hash_blocks,
    is_local_kv,
    pick_colocated,
    pick_decode,
    pick_local_prefill,
    pick_prefill,
    pick_same_replica,
)
from router.registry import DECODE, PREFILL, Registry, Replica
from router.tokenizer import TextCodec
from router.validate import Prepared

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


class RequestRun:
    """One admitted request: its lease, deadline, clock and what the client has received."""

    def __init__(self, prep: Prepared, deps: FlowDeps, write: Write, remaining: Remaining,
                 ticket: Ticket) -> None:
        self.prep = prep
        self.deps = deps
        self.remaining = remaining
        self.ticket = ticket
        self.lease = Lease(request_id=prep.request_id)
        self.clock = RequestClock(deps.observer)
        self.sent = Sent(OutputState(prep, deps.codec, deps.config.eos_token_ids), write)

    @property
    def finished(self) -> bool:
        return self.sent.out.finished

    def timeout(self) -> float | None:
        """Seconds left for a worker call; raises DEADLINE_EXCEEDED when none are."""
        left = self.remaining()
        if left is not None and left <= 0:
            raise RouterError(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded")
        return left

    async def watched(self, replica: Replica, aw: Awaitable[T]) -> T:
        return await watched(replica, self.deps.registry, self.deps.config.heartbeat_seconds, aw)

    def give_back(self) -> None:
        """Releases the KV lease in the background when it is still ours."""
        if self.lease.replica is not None:
            timeout = self.deps.config.release_timeout_seconds
            self.deps.spawn(release_kv(self.lease.replica, self.lease.request_id, timeout))
            self.lease.replica = None

    async def first_token(self, first: worker_pb2.PrefillResponse, prefill: Replica) -> None:
        """Prefill is over: its first token goes to the client at once (TTFT is prefill's)."""
        self.ticket.prefill_done()
        await self.sent.emit([first.first_token], [first.first_logprob])
        self.clock.first_token(prefill.replica_id)

    def decode_request(self, prompt: Sequence[int], first: worker_pb2.PrefillResponse,
                       sampling: worker_pb2.WorkerSampling, prefill: Replica) -> worker_pb2.DecodeRequest:
        return worker_pb2.DecodeRequest(
            request_id=self.lease.request_id, prompt_token_ids=prompt, first_token=first.first_token,
            sampling=sampling, kv=first.kv, prefill_address=prefill.address,
        )

    def blocks_needed(self, request: worker_pb2.DecodeRequest) -> int:
        return blocks_needed(len(request.prompt_token_ids), request.sampling.max_tokens,
                             self.deps.config.block_size)

    async def prefill(self, prompt: Sequence[int], sampling: worker_pb2.WorkerSampling
                      ) -> tuple[Replica, worker_pb2.PrefillResponse]:
        """Prefill on the best replica; after a RETRYABLE failure, on the next best (worker_retries
        more)."""
        cfg = self.deps.config
        hashes = hash_blocks(prompt, cfg.block_size, cfg.affinity_blocks)
        request = worker_pb2.PrefillRequest(request_id=self.lease.request_id, prompt_token_ids=prompt,
                                            sampling=sampling)
        tried: set[str] = set()
        last: RouterError | None = None
        for _ in range(cfg.worker_retries + 1):
            replica = self._pick_prefill(prompt, hashes, tried)
            if replica is None:
                break
            tried.add(replica.replica_id)
            try:
                response = await self._call_prefill(replica, request)
            except Failed as f:
                last = f.error
                if f.code not in RETRYABLE:
                    raise last from None
                continue
            self.deps.memory.record(hashes, replica.replica_id)
            return replica, response
        raise last or unavailable("prefill")

    def _pick_prefill(self, prompt: Sequence[int], hashes: Sequence[int], tried: set[str]) -> Replica | None:
        cfg, registry = self.deps.config, self.deps.registry
        ready = [r for r in registry.ready(PREFILL) if r.replica_id not in tried]
        decoders = registry.ready(DECODE)
        return (pick_local_prefill([r for r in decoders if r.replica_id not in tried], prompt, cfg)
                or pick_colocated(ready, decoders, cfg.affinity_max_imbalance_tokens)
                or pick_prefill(ready, hashes, self.deps.memory, cfg.affinity_max_imbalance_tokens))

    async def _call_prefill(self, replica: Replica, request: worker_pb2.PrefillRequest
                            ) -> worker_pb2.PrefillResponse:
        n = len(request.prompt_token_ids)
        replica.outstanding_prompt_tokens += n
        self.lease.replica = replica
        try:
            call = replica.prefill.Prefill(request, timeout=self.timeout())
            response: worker_pb2.PrefillResponse = await self.watched(replica, call)
            return response
        except (grpc.aio.AioRpcError, ReplicaLost) as e:
            f = call_failed("prefill", replica, e)
            if f.code not in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED):
                self.lease.replica = None  # the worker failed the call (or is gone): it holds nothing for us
            raise f from None
        finally:
            replica.outstanding_prompt_tokens -= n

    async def decode(self, first: worker_pb2.PrefillResponse, prefill: Replica,
                     failed: set[str] | None = None) -> None:
        """Decode on the best replica (not one of `failed`). Before its first message,
        RESOURCE_EXHAUSTED moves the request to another replica with the same KV lease; a replica
        that dies is replaced by a migration."""
        request = self.decode_request(self.prep.prompt_ids, first, self.prep.sampling, prefill)
        failed = set(failed or ())
        last: RouterError | None = None
        for attempt in range(self.deps.config.worker_retries + 1):
            replica = pick_decode([r for r in self.deps.registry.ready(DECODE) if r.replica_id not in failed])
            if replica is None:
                break
            if attempt and self.lease.replica is None:  # the KV lease is gone: prefill what was sent again
                request = await self._migrate(attempt)
                if self.finished:
                    return
            if is_local_kv(request.kv):  # the KV stays in the engine that prefilled it: decode there
                replica = pick_same_replica(self.deps.registry.ready(DECODE), request.prefill_address)
                if replica is None:
                    break
            try:
                await self.stream_decode(replica, request, self.blocks_needed(request))
                return
            except Failed as f:
                failed.add(replica.replica_id)
                last = f.error
                self._after_decode_failure(f)
        raise last or unavailable("decode")

    def _after_decode_failure(self, f: Failed) -> None:
        """Raises the error when the request cannot try another decode replica; gives the lease
        back when the next try must migrate."""
        if f.code not in RETRYABLE:
            raise f.error from None
        if f.code == grpc.StatusCode.RESOURCE_EXHAUSTED and self.lease.replica is not None:
            return  # refused before pulling: the lease still holds the KV
        if not self.deps.config.migration:
            if self.lease.replica is None:
                raise f.error from None  # tokens were streamed: without migration, give up
            return  # before its first message: another replica may still pull the lease
        self.give_back()

    async def _migrate(self, n: int) -> worker_pb2.DecodeRequest:
        """Prefills prompt + sent tokens under a new worker request id; streams the new first token."""
        self.lease.request_id = f"{self.prep.request_id}/m{n}"
        prompt = list(self.prep.prompt_ids) + self.sent.tokens
        sampling = worker_pb2.WorkerSampling()
        sampling.CopyFrom(self.prep.sampling)
        sampling.max_tokens = self.prep.sampling.max_tokens - len(self.sent.tokens)
        replica, first = await self.prefill(prompt, sampling)
        await self.sent.emit([first.first_token], [first.first_logprob])
        return self.decode_request(prompt, first, sampling, replica)

    async def stream_decode(self, replica: Replica, request: worker_pb2.DecodeRequest, blocks: int,
                            call: grpc.aio.UnaryStreamCall | None = None) -> None:
        """Forwards the decode stream to the client (`call`: one already opened with `request`)."""
        if call is None:
            call = replica.decode.Decode(request, timeout=self.timeout())
        replica.reserved_blocks += blocks
        replica.open_streams += 1
        worker_done = False
        try:
            while True:
                try:
                    response = await self.watched(replica, call.read())
                except (grpc.aio.AioRpcError, ReplicaLost) as e:
                    raise call_failed("decode", replica, e) from None
                if response is grpc.aio.EOF:
                    break
                worker_done = response.finish_reason != worker_pb2.FINISH_NONE
                if self.lease.replica is not None:  # decode has pulled the KV and released the lease
                    self.lease.replica = None
                    replica.reserved_blocks -= blocks
                    blocks = 0
                await self.sent.emit(response.token_ids, response.logprobs, response.finish_reason)
                self.clock.tokens(replica.replica_id, len(response.token_ids))
                if self.finished:
                    self.clock.finished(replica.replica_id)
                    return
            raise RouterError(grpc.StatusCode.INTERNAL,
                              f"decode replica {replica.replica_id}: stream ended without a finish reason")
        finally:
            if not worker_done:
                call.cancel()  # the router finished first, or is cancelled: the worker aborts the request
            replica.reserved_blocks -= blocks
            replica.open_streams -= 1
