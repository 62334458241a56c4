"""The decode replica's gRPC service.

Lifecycle of a request here:
  1. `Decode` arrives with the prompt ids, prefill's first token and the KVHandle.
  2. The engine reserves blocks for the prompt's KV (waiting up to `admission_wait_seconds` for room;
     RESOURCE_EXHAUSTED after that, so the router can try another replica).
  3. Every decode rank pulls its own KV heads from the prefill ranks holding them straight into those
     blocks, all at once (timeout-bounded; `pull` is the replica's, decode_worker/replica.py), then
     the prefill replica is told to release its lease (also when the pull failed).
  4. `resume` joins the request to the running batch; every engine step's new tokens for it leave as
     one DecodeResponse (tokens that piled up while the stream was busy are merged into one message).
  5. A cancelled stream aborts the request: the engine frees its blocks, whatever state it was in
     (waiting for room, pulling, decoding); a pull that was cut short never joins the batch.

Errors: malformed metadata (KVHandle not matching the request, token ids outside the vocabulary)
is INVALID_ARGUMENT before anything is allocated; a failed pull is UNAVAILABLE; a dead engine is
UNAVAILABLE at once, before or during the stream (the router migrates the request). The pull's
timeout is also bounded by the call's deadline.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import NoReturn

import grpc
from pdserve.v1 import worker_pb2, worker_pb2_grpc

from engine.async_engine import AsyncEngine, RequestStream
from engine.engine import StepOutput
from engine.finish import FinishReason
from engine.sampling import SamplingParams
from kv_transfer.handle import KVHandle
from kv_transfer.interfaces import TransferError

log = logging.getLogger(__name__)

FINISH = {
    FinishReason.STOP: worker_pb2.FINISH_STOP,
    FinishReason.LENGTH: worker_pb2.FINISH_LENGTH,
    FinishReason.ABORT: worker_pb2.FINISH_ABORT,
}

Pull = Callable[[KVHandle, list[int], float], Awaitable[None]]
PullChunk = Callable[[KVHandle, int, list[int], float], Awaitable[int | None]]  # -> first token or None
Release = Callable[[str, str], Awaitable[None]]


# Every gRPC server of a worker: requests and answers above this size are refused (RESOURCE_EXHAUSTED)
# before they are parsed; a prompt of 128k tokens is well under 1 MiB on the wire.
MAX_MESSAGE_BYTES = 4 << 20
SERVER_OPTIONS = (
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
)

class DecodeService(worker_pb2_grpc.DecodeWorkerServicer):
    def __init__(
        self,
        engine: AsyncEngine,
        pull: Pull,
        release: Release,
        transfer_timeout: float,
        admission_wait: float,
    ) -> None:
        self.engine = engine
        self.pull = pull
        self.release = release
        self.transfer_timeout = transfer_timeout
        self.admission_wait = admission_wait
        self.active: set[str] = set()
        self.pull_chunk: PullChunk | None = None  # streamed handles (kv_transfer.streaming)

    async def Decode(  # noqa: N802 - gRPC method name
        self, request: worker_pb2.DecodeRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[worker_pb2.DecodeResponse]:
        rid = request.request_id
        if not rid or rid in self.active:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"request_id {rid!r} is empty or in use")
        if self.engine.error is not None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"decode engine failed: {self.engine.error!r}")
        try:
            params = SamplingParams.from_wire(request.sampling)
            handle = KVHandle.from_proto(request.kv)
            self._check(request, handle)
        except (ValueError, TransferError) as exc:
            await self.release(request.prefill_address, rid)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        self.active.add(rid)
        try:
            stream = await self._admit_and_pull(request, params, handle, context)
            async for message in self._stream(stream):
                yield message
        except EngineFailed as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
        finally:
            self.active.discard(rid)
            self.engine.abort(rid)  # a no-op once finished; frees everything if cancelled

    def _check(self, request: worker_pb2.DecodeRequest, handle: KVHandle) -> None:
        """The handle must describe this request's prompt; the first token must be a real token
        (the engine embeds it without looking)."""
        vocab = self.engine.model_config.vocab_size
        if handle.request_id != request.request_id:
            raise ValueError(f"kv.request_id {handle.request_id!r} is not the request's id")
        if handle.num_tokens != len(request.prompt_token_ids):
            raise ValueError(f"kv.num_tokens {handle.num_tokens} != {len(request.prompt_token_ids)} prompt tokens")
        if request.kv.stream_chunk_blocks and self.pull_chunk is None:
            raise ValueError("a streamed KVHandle, but this replica cannot pull chunk by chunk")
        if not 0 <= request.first_token < vocab:
            raise ValueError(f"first_token {request.first_token} is outside the vocabulary [0, {vocab})")

    async def _admit_and_pull(
        self,
        request: worker_pb2.DecodeRequest,
        params: SamplingParams,
        handle: KVHandle,
        context: grpc.aio.ServicerContext,
    ) -> RequestStream:
        rid, prompt = request.request_id, list(request.prompt_token_ids)
        try:
            blocks = await self.engine.reserve(rid, prompt, request.first_token, params, self.admission_wait)
            if blocks is None:
                await abort_call(context, grpc.StatusCode.RESOURCE_EXHAUSTED,
                                 f"no free KV blocks for {len(prompt)} tokens")
            stream = self.engine.open_stream(rid)
            if request.kv.stream_chunk_blocks:
                first = await self._pull_streamed(handle, list(blocks), request.kv.stream_chunk_blocks, context)
                await self.engine.set_first_token(rid, first)
            else:
                await self.pull(handle, list(blocks), _bounded(self.transfer_timeout, context))
            await self.engine.resume(rid)
        except TransferError as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"KV transfer failed: {exc}")
        except ValueError as exc:  # the engine refused the request (prompt too long, bad ids)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except RuntimeError as exc:  # the engine died
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
        finally:
            await self.release(request.prefill_address, rid)
        return stream

    async def _pull_streamed(self, handle: KVHandle, blocks: list[int], chunk: int,
                             context: grpc.aio.ServicerContext) -> int:
        """Pulls a streamed handle chunk by chunk, in order (each pull waits at the source until the
        chunk is computed; the timeout applies per chunk); returns the prefill's first token."""
        assert self.pull_chunk is not None
        first = None
        for start in range(0, len(blocks), chunk):
            dst = blocks[start : start + chunk]
            first = await self.pull_chunk(handle, start, dst, _bounded(self.transfer_timeout, context))
        vocab = self.engine.model_config.vocab_size
        if first is None or not 0 <= first < vocab:
            raise TransferError(f"the last chunk's pull carried no valid first token ({first})")
        return first

    async def _stream(self, stream: RequestStream) -> AsyncIterator[worker_pb2.DecodeResponse]:
        while True:
            outs = [await stream.next()] + stream.drain()
            if any(out.finish_reason == FinishReason.ERROR for out in outs):  # the engine died under us
                raise EngineFailed(f"decode engine failed: {self.engine.error!r}")
            message = _merge(outs)
            yield message
            if message.finish_reason != worker_pb2.FINISH_NONE:
                return


class EngineFailed(RuntimeError):
    """The engine thread died while the request was running (answered UNAVAILABLE)."""


def _bounded(timeout: float, context: grpc.aio.ServicerContext) -> float:
    left = context.time_remaining()
    return timeout if left is None else max(0.0, min(timeout, left))


async def abort_call(context: grpc.aio.ServicerContext, code: grpc.StatusCode, message: str) -> NoReturn:
    """context.abort, typed as never returning (it raises to end the call)."""
    await context.abort(code, message)
    raise AssertionError("context.abort returned")


def _merge(outs: list[StepOutput]) -> worker_pb2.DecodeResponse:
    message = worker_pb2.DecodeResponse()
    for out in outs:
        message.token_ids.extend(out.token_ids)
        message.logprobs.extend(out.logprobs)
        if out.finish_reason is not None:
            message.finish_reason = FINISH.get(out.finish_reason, worker_pb2.FINISH_ABORT)
    return message
