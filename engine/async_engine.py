"""AsyncEngine: drives an LLMEngine on its own thread for an asyncio server.

Lifecycle of a request:
  1. `submit(...)` (or `reserve` + `resume`, or `adopt` of a held prompt) queues a command for the
     engine thread; the caller reads the request's `RequestStream`.
  2. The engine thread applies queued commands between steps, runs `step()` while there is work,
     and pushes each StepOutput to the request's stream (thread-safe, via the event loop).
  3. The caller iterates the stream until a StepOutput with a finish_reason arrives.
  4. `abort(request_id)` at any time frees the request's blocks; its stream ends with ABORT.

Workers use the typed methods below (reserve, set_first_token, resume, adopt, request_rows,
shutdown): each runs on the engine thread and answers through a future, so no caller touches the
LLMEngine or a Request. Counters and `prefix_hashes()` are read without a round trip (each a single
read of engine state; together they may be a step stale).

Waiting for the engine never polls: the engine thread sleeps on its command queue while it has no
work, and `next_change()` gives the event loop a future that completes after the next step or abort
(when blocks may have been computed or freed).

A request the engine refuses (ValueError from add_request: bad token ids, too long) ends its stream
with ERROR and `stream.error` set; the engine keeps serving. An exception from `step()` kills the
engine: every open stream ends with ERROR, `error` is set, and later calls fail at once (nothing
waits on a dead engine thread).

The engine itself is not thread-safe: every engine call happens on the engine thread. Fault
injection for tests and drills (slow steps) lives in engine/faults.py, never called from here.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch

from engine.config import ModelConfig
from engine.engine import LLMEngine, StepOutput
from engine.finish import FinishReason
from engine.kv_cache import CacheConfig
from engine.quant import weight_bytes
from engine.sampling import SamplingParams

T = TypeVar("T")
HASH_COPY_TRIES = 3  # prefix_hashes(): the engine thread may change the table while it is copied


@dataclass(slots=True)
class RequestStream:
    """Step outputs of one request, delivered on the caller's event loop."""

    request_id: str
    queue: asyncio.Queue[StepOutput] = field(default_factory=asyncio.Queue)
    error: str | None = None  # why the engine refused the request (its last output is ERROR)

    async def next(self, timeout: float | None = None) -> StepOutput:
        return await asyncio.wait_for(self.queue.get(), timeout)

    def drain(self) -> list[StepOutput]:
        """Everything already delivered, without waiting (lets callers batch tokens)."""
        items = []
        while not self.queue.empty():
            items.append(self.queue.get_nowait())
        return items


@dataclass(frozen=True, slots=True)
class RequestRow:
    """One request the engine still knows (diagnostics: leak hunts)."""

    request_id: str
    status: str  # RequestStatus value
    blocks: int


class AsyncEngine:
    """Owns the engine thread. All public methods are safe to call from the event loop."""

    def __init__(self, engine: LLMEngine, loop: asyncio.AbstractEventLoop) -> None:
        self.engine = engine
        self._loop = loop
        self._commands: queue.Queue[Callable[[], None]] = queue.Queue()
        self._streams: dict[str, RequestStream] = {}
        self._stopped = threading.Event()
        self._error: BaseException | None = None
        self._calls: set[asyncio.Future[Any]] = set()  # call() futures not answered yet
        self._change_waiters: list[asyncio.Future[None]] = []  # next_change() futures
        self._waiters_lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self._thread.start()

    # --- calls from the event loop -------------------------------------------------------
    def submit(self, request_id: str, prompt: list[int], params: SamplingParams,
               hold_kv: bool = False) -> RequestStream:
        stream = self._open(request_id)

        def add() -> None:
            try:
                self.engine.add_request(request_id, prompt, params, hold_kv=hold_kv)
            except ValueError as exc:  # a bad request fails alone, the engine goes on
                stream.error = str(exc)
                self._streams.pop(request_id, None)
                self._deliver(stream, StepOutput(request_id, [], [], FinishReason.ERROR))

        self._commands.put(add)
        self._fail_if_dead(stream)
        return stream

    async def call(self, fn: Callable[[], T]) -> T:
        """Runs fn on the engine thread between steps and returns its result. Workers use the typed
        methods below instead (the prefill worker still calls this until its own methods land)."""
        if self._error is not None:
            raise RuntimeError(f"engine failed: {self._error!r}")
        done: asyncio.Future[T] = self._loop.create_future()
        self._calls.add(done)
        done.add_done_callback(self._calls.discard)

        def run() -> None:
            try:
                result = fn()
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                self._loop.call_soon_threadsafe(_set_exception, done, exc)
            else:
                self._loop.call_soon_threadsafe(_set_result, done, result)

        self._commands.put(run)
        if self._error is not None:  # died between the check and the put
            self._fail_calls()
        return await done

    def next_change(self) -> asyncio.Future[None]:
        """A future (on the caller's loop) that completes after the engine's next step or abort,
        or at once when the engine is dead. Take it before reading the engine's state, so a
        change between the read and the wait is not missed."""
        fut: asyncio.Future[None] = self._loop.create_future()
        with self._waiters_lock:
            if self._error is None:
                self._change_waiters.append(fut)
                return fut
        fut.set_result(None)
        return fut

    def open_stream(self, request_id: str) -> RequestStream:
        stream = self._open(request_id)
        self._fail_if_dead(stream)
        return stream

    def abort(self, request_id: str) -> None:
        self._commands.put(lambda: self._abort(request_id))

    def close(self) -> None:
        self._stopped.set()
        self._commands.put(lambda: None)
        self._thread.join(timeout=10)

    @property
    def error(self) -> BaseException | None:
        return self._error

    # --- what workers ask of the engine (decode side, colocated replica, deploy) ---------
    @property
    def model_config(self) -> ModelConfig:
        return self.engine.model_config

    @property
    def kv(self) -> torch.Tensor:
        """The KV cache the replica's rank-0 source serves: [N, L, 2, H_rank, B, D]."""
        return self.engine.kv

    @property
    def num_running(self) -> int:
        return self.engine.num_running

    @property
    def num_waiting(self) -> int:
        return self.engine.num_waiting

    @property
    def num_free_blocks(self) -> int:
        return self.engine.num_free_blocks

    @property
    def num_total_blocks(self) -> int:
        return self.engine.num_total_blocks

    def weight_bytes(self) -> int:
        return weight_bytes(self.engine.model)

    async def reserve(self, request_id: str, prompt: list[int], first_token: int, params: SamplingParams,
                      wait: float) -> list[int] | None:
        """Decode role: reserves blocks for a prefilled prompt's KV (the request awaits its KV), waiting
        up to `wait` seconds for a step or abort to free room; None when there is still none.
        Raises ValueError when the engine refuses the request, RuntimeError when it is dead."""
        deadline = time.monotonic() + wait
        while True:
            changed = self.next_change()  # taken first: a change during the call is not missed
            blocks = await self.call(lambda: self.engine.add_prefilled(request_id, prompt, first_token, params))
            left = deadline - time.monotonic()
            if blocks is not None or left <= 0:
                return blocks
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(changed, left)

    async def set_first_token(self, request_id: str, token: int) -> None:
        """Streamed hand-off: the prefill's first token arrives with the last chunk, after `reserve`."""
        await self.call(lambda: _set_first_token(self.engine, request_id, token))

    async def resume(self, request_id: str) -> None:
        """The reserved request's KV has arrived: it joins the running batch."""
        await self.call(lambda: self.engine.resume(request_id))

    async def adopt(self, request_id: str, params: SamplingParams) -> None:
        """Colocated: a held prompt's blocks become a running decode request (KeyError / ValueError)."""
        await self.call(lambda: self.engine.adopt(request_id, params))

    async def request_rows(self) -> list[RequestRow]:
        return await self.call(lambda: _request_rows(self.engine))

    async def shutdown(self) -> None:
        """Stops the follower ranks (TP); the engine cannot step afterwards."""
        await self.call(self.engine.shutdown)

    def prefix_hashes(self, limit: int) -> list[int]:
        """The newest `limit` prefix-block hashes in the cache (a copy; empty if it kept changing)."""
        table = self.engine.allocator.hash_to_block
        for _ in range(HASH_COPY_TRIES):
            with contextlib.suppress(RuntimeError):  # changed size while copied
                return list(table)[-limit:]
        return []

    def _fail_if_dead(self, stream: RequestStream) -> None:
        if self._error is not None:
            self._streams.pop(stream.request_id, None)
            stream.queue.put_nowait(StepOutput(stream.request_id, [], [], FinishReason.ERROR))

    def _fail_calls(self) -> None:
        error = RuntimeError(f"engine failed: {self._error!r}")
        for done in list(self._calls):
            self._loop.call_soon_threadsafe(_set_exception, done, error)

    # --- the engine thread ---------------------------------------------------------------
    def _open(self, request_id: str) -> RequestStream:
        stream = RequestStream(request_id)
        self._streams[request_id] = stream
        return stream

    def _abort(self, request_id: str) -> None:
        self.engine.abort(request_id)
        stream = self._streams.pop(request_id, None)
        if stream is not None:
            self._deliver(stream, StepOutput(request_id, [], [], FinishReason.ABORT))
        self._changed()

    def _run(self) -> None:
        try:
            while not self._stopped.is_set():
                self._apply_commands(block=not self.engine.has_work())
                if self.engine.has_work():
                    for out in self.engine.step():
                        self._publish(out)
                    self._changed()
        except BaseException as exc:  # noqa: BLE001 - a dead engine must fail its streams
            with self._waiters_lock:
                self._error = exc
            for stream in list(self._streams.values()):
                self._deliver(stream, StepOutput(stream.request_id, [], [], FinishReason.ERROR))
            self._streams.clear()
            self._fail_calls()
            self._changed()

    def _changed(self) -> None:
        """Completes every next_change() future taken so far."""
        with self._waiters_lock:
            waiters, self._change_waiters = self._change_waiters, []
        for fut in waiters:
            self._loop.call_soon_threadsafe(_set_result, fut, None)

    def _apply_commands(self, block: bool) -> None:
        """Runs the queued commands; with block, sleeps until one comes (close() sends one)."""
        try:
            command = self._commands.get() if block else self._commands.get_nowait()
        except queue.Empty:
            return
        command()
        while True:
            try:
                self._commands.get_nowait()()
            except queue.Empty:
                return

    def _publish(self, out: StepOutput) -> None:
        stream = self._streams.get(out.request_id)
        if stream is None:
            return
        if out.finish_reason is not None:
            del self._streams[out.request_id]
        self._deliver(stream, out)

    def _deliver(self, stream: RequestStream, out: StepOutput) -> None:
        self._loop.call_soon_threadsafe(stream.queue.put_nowait, out)

    # --- prefill worker ----------------------------------------------------------------------
    # What a prefill replica reads of its engine beyond the counts above: the cache layout it
    # describes in a handle, a held request's blocks and progress (read on the engine thread,
    # answered by a future the engine thread completes).
    @property
    def cache_config(self) -> CacheConfig:
        return self.engine.cache_config

    async def kv_block_ids(self, request_id: str) -> list[int]:
        """A held (hold_kv) request's blocks, token order; KeyError when it is gone."""
        engine = self.engine
        blocks: list[int] = await self.call(lambda: engine.kv_block_ids(request_id))
        return blocks

    async def prefill_progress(self, request_id: str) -> PrefillProgress | None:
        """A prefilling request's block table and how many of its blocks hold computed KV; None
        while it has no blocks (queued, or gone)."""
        engine = self.engine
        progress: PrefillProgress | None = await self.call(lambda: _read_progress(engine, request_id))
        return progress


def _set_first_token(engine: LLMEngine, request_id: str, token: int) -> None:
    engine.requests[request_id].output_token_ids = [token]


def _request_rows(engine: LLMEngine) -> list[RequestRow]:
    return [RequestRow(rid, req.status.value, len(req.block_table)) for rid, req in engine.requests.items()]


def _set_result(future: asyncio.Future[Any], value: Any) -> None:
    if not future.done():
        future.set_result(value)


def _set_exception(future: asyncio.Future[Any], exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)


# --- prefill worker ------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class PrefillProgress:
    """A request's KV on a prefill engine: its block table so far and the leading blocks that hold
    computed KV."""

    block_ids: tuple[int, ...]
    ready_blocks: int


def _read_progress(engine: LLMEngine, request_id: str) -> PrefillProgress | None:
    """Runs on the engine thread. The last block counts as ready only with the first token (the
    worker's final update), never from the computed-token count alone."""
    req = engine.requests.get(request_id)
    if req is None or not req.block_table:
        return None
    bs = engine.cache_config.block_size
    last = -(-len(req.prompt_token_ids) // bs) - 1
    return PrefillProgress(tuple(req.block_table), min(req.num_computed_tokens // bs, last))
