"""Fault injection for tests and drills: a wrapper a test installs on a live KV source. Nothing on
a production path calls into this module; deploy's `fail_next_pulls` drill method installs it."""

from __future__ import annotations

import threading
from collections.abc import Callable

from kv_transfer.source import Answer, KVSource, refuse

INJECTED = "injected failure (fail_next_pulls)"


class FailingPulls:
    """Stands in for a source's `answer`: refuses the next `left` pulls that would have been
    served, then answers as the source does."""

    def __init__(self, answer: Callable[[bytes], Answer], left: int) -> None:
        self._answer = answer
        self._lock = threading.Lock()  # torch_dist answers from several threads
        self.left = left

    def set(self, left: int) -> None:
        with self._lock:
            self.left = left

    def __call__(self, data: bytes) -> Answer:
        answer = self._answer(data)
        if not answer.response.ok:
            return answer
        with self._lock:
            if self.left <= 0:
                return answer
            self.left -= 1
        answer.sent()  # its staging buffers go back unsent
        return refuse(INJECTED)


def fail_next_pulls(source: KVSource, n: int) -> None:
    """The next n pulls `source` would serve are refused (a later call resets the count)."""
    installed = vars(source).get("answer")
    if isinstance(installed, FailingPulls):
        installed.set(n)
    else:
        vars(source)["answer"] = FailingPulls(source.answer, n)
