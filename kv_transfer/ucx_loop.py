"""The process's UCX loop: the one asyncio loop that owns every ucxx object of the process and
progresses UCX itself, so a UCX message costs one thread wake-up and nothing waits by spinning.

ucxx offers two ways to complete an awaited request and both cost here. By default a Python loop
polls the request (`wait_yield`: check, `sleep(0)`, check...), which keeps the event loop at 100%
of a core for as long as anything waits, an idle source's receive included. With Python futures
on, UCX's progress thread wakes ucxx's notifier thread, which schedules a coroutine on the loop
and waits for it: three wake-ups per message, ~450 us per control round trip on a 2-core VM.

pdserve does neither. `UCXProgress` registers the UCX worker's epoll descriptor with this loop: when
UCX has an event the loop wakes, progresses the worker, completes the asyncio future of every
request UCX finished, and re-arms the worker before it sleeps again. Requests are posted from this
thread (no delayed submission, no progress thread), so a round trip of a control message is ~0.17
ms (benchmarks/ucx_rtt.py). Every UCX coroutine of the process runs on this loop: a serving process
names its own loop (`serve_on_running_loop`), else the loop is a thread of its own, and callers on
any other loop (a test's `asyncio.run`) hand their coroutine over with `on_ucx_loop`: one thread
hop per call, not per message. ucxx's own awaits (the connection handshake, closing) still use
`wait_yield` for the milliseconds they last, progressed by the same descriptor.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

import torch
import ucxx
from ucxx._lib.arr import Array
from ucxx._lib_async import application_context
from ucxx.types import Tag, TagMaskFull

T = TypeVar("T")

# UCX transports pdserve uses unless UCX_TLS is set in the environment: all but cma. On one host
# UCX's rendezvous for large messages is cma (process_vm_readv), which moved a 16-256 MB payload at
# 3.4-4.8 GB/s on the 2-core test VM where its shared-memory copy (posix/sysv) moved 4.6-8.7 GB/s
# (benchmarks/kv_transfer.py --tls, docs/kv_transfer.md); between hosts and on GPUs cma plays no part.
DEFAULT_TLS = "^cma"

# Progress at least this often while a transfer is in flight, in case a transport completes
# something without raising an event (the bound the progress thread's epoll timeout used to set);
# while only receives that wait for a peer's next request are pending, once a second.
BUSY_PROGRESS_S = 0.02
IDLE_PROGRESS_S = 1.0


class _UCXLoop:
    """Starts ucxx on first use, on the process's serving loop when it named one and the first use
    comes from it, else on a loop thread of its own; later calls get the same loop."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._progress: UCXProgress | None = None
        self.serving: asyncio.AbstractEventLoop | None = None

    def get(self) -> UCXProgress:
        """The process's UCXProgress (its loop: `.loop`), started on first use."""
        with self._lock:
            if self._progress is None:
                self._progress = self._on_serving_loop() or _start()
            return self._progress

    def _on_serving_loop(self) -> UCXProgress | None:
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            return None
        return _init_ucx(running) if running is self.serving else None


_HOME = _UCXLoop()  # one per process, like ucxx's own context


def ucx_loop() -> asyncio.AbstractEventLoop:
    """The loop every UCX call of this process runs on (started, with ucxx, on first use)."""
    return _HOME.get().loop


def serve_on_running_loop() -> None:
    """Names the running loop as this process's serving loop: if UCX starts from it, it runs on it,
    and its pulls and served requests need no hop to another thread (two thread wake-ups, ~0.25 ms
    per pull on the 2-core test VM). Only for a loop that lives as long as the process (a Serve
    replica's, a Ray actor's): a loop that closes would take the process's UCX with it."""
    _HOME.serving = asyncio.get_running_loop()


def _start() -> UCXProgress:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="pdserve-ucx", daemon=True)
    thread.start()
    return asyncio.run_coroutine_threadsafe(_init_on_loop(), loop).result(60)


async def _init_on_loop() -> UCXProgress:
    return _init_ucx(asyncio.get_running_loop())


def _init_ucx(loop: asyncio.AbstractEventLoop) -> UCXProgress:
    """On the UCX loop's thread: ucxx in blocking mode, progressed by this loop (`UCXProgress`),
    which ucxx then treats as the loop's progress task instead of starting its own."""
    ucxx.init(options={"TLS": DEFAULT_TLS}, env_takes_precedence=True,
              progress_mode="blocking", enable_delayed_submission=False, enable_python_future=False)
    if torch.cuda.is_available():
        # UCX's CUDA transports work in the progressing thread's current CUDA context (ucxx's
        # progress thread set one when it started): make the device's primary context current here.
        torch.cuda.set_device(torch.cuda.current_device())
    progress = UCXProgress(ucxx.core._get_ctx().worker, loop)
    application_context.ProgressTasks[loop] = progress
    return progress


class UCXProgress:
    """Progresses the UCX worker when its epoll descriptor reports an event and completes the
    futures of the requests it finished. Only the UCX loop's thread calls it."""

    def __init__(self, worker: Any, loop: asyncio.AbstractEventLoop) -> None:
        self._worker = worker
        self.loop = loop
        self._pending: dict[int, tuple[Any, asyncio.Future[None], bool]] = {}
        self._kicked = False
        self._timer: asyncio.TimerHandle | None = None
        worker.init_blocking_progress_mode()
        loop.add_reader(worker.epoll_file_descriptor, self._drain)

    def watch(self, request: Any, idle: bool = False) -> asyncio.Future[None]:
        """A future that completes (or fails with the request's error) when request does. idle:
        a receive that waits for a peer's next request, which may never come."""
        done: asyncio.Future[None] = self.loop.create_future()
        self._pending[id(request)] = (request, done, idle)
        self.kick()
        return done

    def kick(self) -> None:
        """Progress soon: a request just posted may need it before UCX raises an event."""
        if not self._kicked:
            self._kicked = True
            self.loop.call_soon(self._drain)

    def _drain(self) -> None:
        self._kicked = False
        while True:
            while self._worker.progress_once():
                pass
            self._complete()
            if self._worker.arm():  # nothing left to progress: the next event wakes the loop
                self._schedule_tick()
                return

    def _complete(self) -> None:
        finished = [key for key, (request, _, _) in self._pending.items() if request.completed]
        for key in finished:
            request, done, _ = self._pending.pop(key)
            if done.done():
                continue
            try:
                request.check_error()
            except Exception as e:  # noqa: BLE001 - the request's failure is its waiter's
                done.set_exception(e)
            else:
                done.set_result(None)

    def _schedule_tick(self) -> None:
        if not self._pending:
            return
        busy = any(not idle for _, _, idle in self._pending.values())
        at = self.loop.time() + (BUSY_PROGRESS_S if busy else IDLE_PROGRESS_S)
        if self._timer is None or at < self._timer.when():
            if self._timer is not None:
                self._timer.cancel()
            self._timer = self.loop.call_at(at, self._tick)

    def _tick(self) -> None:
        self._timer = None
        self._drain()


async def send(ep: Any, buffer: Any, tag: int | None = None) -> None:
    """Sends buffer on ep (a ucxx Endpoint) with exactly this tag, or with the endpoint's own
    message tag, agreed with its peer when it connected. Runs on the UCX loop."""
    _check_open(ep)
    tag = ep._tags["msg_send"] if tag is None else tag
    await _HOME.get().watch(ep._ep.tag_send(Array(buffer), Tag(tag)))


async def recv(ep: Any, buffer: Any, tag: int | None = None, idle: bool = False) -> None:
    """Receives the message tagged tag (default: the endpoint's own) on ep into buffer. idle: it
    waits for a peer's next request (see UCXProgress.watch)."""
    _check_open(ep)
    tag = ep._tags["msg_recv"] if tag is None else tag
    await _HOME.get().watch(ep._ep.tag_recv(Array(buffer), Tag(tag), TagMaskFull), idle)


def _check_open(ep: Any) -> None:
    if ep.closed or ep._ep is None:
        raise ucxx.exceptions.UCXCloseError("Endpoint closed")
    ep._ep.raise_on_error()


async def on_ucx_loop(coro: Coroutine[Any, Any, T]) -> T:
    """Runs coro on the UCX loop and returns its outcome. Cancelled, the caller cancels coro and
    waits for it to end before the cancellation goes on (coro may be writing into the caller's
    KV blocks, which must not be freed under it)."""
    loop = ucx_loop()
    caller = asyncio.get_running_loop()
    if caller is loop:
        return await coro
    outcome: asyncio.Future[T] = caller.create_future()
    started: asyncio.Future[asyncio.Task[T]] = asyncio.wrap_future(
        asyncio.run_coroutine_threadsafe(_spawn(coro, outcome, caller), loop), loop=caller
    )
    try:
        return await asyncio.shield(outcome)
    except asyncio.CancelledError:
        task = await _uncancellable(started)
        loop.call_soon_threadsafe(task.cancel)
        await _uncancellable(outcome, suppress=True)
        raise


async def _spawn(coro: Coroutine[Any, Any, T], outcome: asyncio.Future[T],
                 caller: asyncio.AbstractEventLoop) -> asyncio.Task[T]:
    task = asyncio.get_running_loop().create_task(coro)
    task.add_done_callback(lambda t: _hand_back(t, outcome, caller))
    return task


def _hand_back(task: asyncio.Task[T], outcome: asyncio.Future[T], caller: asyncio.AbstractEventLoop) -> None:
    with contextlib.suppress(RuntimeError):  # the caller's loop is closed: nobody waits any more
        caller.call_soon_threadsafe(_settle, outcome, task)


def _settle(outcome: asyncio.Future[T], task: asyncio.Task[T]) -> None:
    if outcome.done():
        return
    if task.cancelled():
        outcome.cancel()
    elif task.exception() is not None:
        outcome.set_exception(task.exception())  # type: ignore[arg-type]
    else:
        outcome.set_result(task.result())


async def _uncancellable(fut: asyncio.Future[T], suppress: bool = False) -> T:
    """Waits for fut to end, whatever cancels the waiter meanwhile."""
    while not fut.done():
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait([fut])
    if suppress:
        with contextlib.suppress(BaseException):
            return fut.result()
        return None  # type: ignore[return-value]
    return fut.result()
