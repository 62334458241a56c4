"""Per-request latency hooks: the router measures TTFT, ITL and TPOT; an observer records them.

The router only times; what records the values (Prometheus in deploy/metrics.py) is injected as a
`RequestObserver`. With none, RequestClock does nothing.

    clock = RequestClock(observer)          # at admission
    clock.first_token(prefill_replica_id)   # TTFT: admission -> first token written
    clock.tokens(decode_replica_id, n)      # each decode message: ITL = gap / n, for each token
    clock.finished(decode_replica_id)       # TPOT: (last - first token) / (tokens after the first)
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Protocol


class RequestObserver(Protocol):
    def ttft(self, replica_id: str, seconds: float) -> None: ...
    def itl(self, replica_id: str, seconds: float, tokens: int) -> None: ...
    def tpot(self, replica_id: str, seconds: float) -> None: ...


@dataclass(slots=True)
class RequestClock:
    observer: RequestObserver | None
    start: float = field(default_factory=time.monotonic)
    first: float = 0.0
    last: float = 0.0
    after_first: int = 0  # tokens streamed after the first one

    def first_token(self, replica_id: str) -> None:
        self.first = self.last = time.monotonic()
        if self.observer is not None:
            self.observer.ttft(replica_id, self.first - self.start)

    def tokens(self, replica_id: str, n: int) -> None:
        now = time.monotonic()
        if self.observer is not None and n:
            self.observer.itl(replica_id, (now - self.last) / n, n)
        self.last, self.after_first = now, self.after_first + n

    def finished(self, replica_id: str) -> None:
        if self.observer is not None and self.after_first:
            self.observer.tpot(replica_id, (self.last - self.first) / self.after_first)
