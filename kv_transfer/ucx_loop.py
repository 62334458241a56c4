"""The process's UCX loop: one thread whose asyncio loop owns every ucxx object of the process.

Why a loop of its own: ucxx completes an awaited request in one of two ways. By default a Python
loop polls the request (`wait_yield`: check, `sleep(0)`, check...), which keeps the event loop at
100% of a core for as long as anything waits, an idle source's receive included. With Python
futures on, a notifier thread sleeps in the kernel until UCX reports completions and then sets the
request's future, so a waiting request costs nothing. But those futures belong to the loop ucxx was
initialised on, and ucxx keeps one context per process. So pdserve initialises ucxx once per
process, on this loop, and runs every UCX coroutine here; callers on any other loop (a Serve
replica's, a test's `asyncio.run`) hand the coroutine over with `on_ucx_loop` and await its end:
one thread hop per call (tens of microseconds), not per message.

ucxx's progress thread sleeps in epoll with a timeout (`EPOLL_TIMEOUT_MS`): the timeout only bounds
how late a completion that raised no event is noticed, so it is a trade of idle wake-ups against
that rare latency (see docs/benchmarks.md, "Idle CPU").
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

import ucxx

T = TypeVar("T")

EPOLL_TIMEOUT_MS = int(os.environ.get("PDSERVE_UCX_EPOLL_TIMEOUT_MS", "20"))


class _UCXLoop:
    """Starts the loop thread and ucxx on first use; later calls get the same loop."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None

    def get(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None:
                self._loop = _start()
            return self._loop


_HOME = _UCXLoop()  # one per process, like ucxx's own context


def ucx_loop() -> asyncio.AbstractEventLoop:
    """The loop every UCX call of this process runs on (started, with ucxx, on first use)."""
    return _HOME.get()


def _start() -> asyncio.AbstractEventLoop:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="pdserve-ucx", daemon=True)
    thread.start()
    asyncio.run_coroutine_threadsafe(_init_ucx(), loop).result(60)
    return loop


async def _init_ucx() -> None:
    """On the UCX loop: ucxx binds its notifier thread to the loop that is current here. Its
    progress thread (started with a 1 ms epoll timeout) is restarted with ours."""
    ucxx.init(progress_mode="thread", enable_python_future=True)
    worker = ucxx.core._get_ctx().worker
    worker.stop_progress_thread()
    worker.start_progress_thread(polling_mode=False, epoll_timeout=EPOLL_TIMEOUT_MS)


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
