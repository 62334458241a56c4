"""Per-request timings -> TTFT / TPOT / ITL percentiles, throughput and goodput (all in ms and /s).

Definitions (those of `vllm bench serve`):
  TTFT  send -> first streamed token.             E2EL  send -> last message.
  TPOT  (E2EL - TTFT) / (output tokens - 1), per request with at least 2 output tokens.
  ITL   gap between consecutive streamed messages of a request (a message may carry several tokens).
  goodput  requests/s that finished successfully and met every SLO bound.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from benchmarks.loadgen.config import SLO

PERCENTILES = (50.0, 90.0, 99.0)


@dataclass(slots=True)
class RequestRecord:
    """What the client saw of one request (times in seconds from the run's start)."""

    prompt_tokens: int
    max_tokens: int
    scheduled: float = 0.0   # when the arrival process wanted it sent
    sent: float = 0.0
    message_times: list[float] = field(default_factory=list)  # arrival of each message with tokens
    output_tokens: int = 0
    done: float = 0.0
    error: str = ""          # gRPC status code name; "" = success
    kind: str = ""

    @property
    def ok(self) -> bool:
        return not self.error

    @property
    def ttft(self) -> float | None:
        return self.message_times[0] - self.sent if self.message_times else None

    @property
    def e2el(self) -> float:
        return self.done - self.sent

    @property
    def tpot(self) -> float | None:
        ttft = self.ttft
        if ttft is None or self.output_tokens < 2:
            return None
        return (self.e2el - ttft) / (self.output_tokens - 1)

    def itls(self) -> list[float]:
        t = self.message_times
        return [b - a for a, b in zip(t, t[1:], strict=False)]


def percentile(values: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default); nan for no values."""
    if not values:
        return math.nan
    s = sorted(values)
    pos = (len(s) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def distribution(values_s: Sequence[float]) -> dict[str, float]:
    """mean / min / max / p50 / p90 / p99 in milliseconds."""
    ms = [1000.0 * v for v in values_s]
    out = {"count": float(len(ms)), "mean": sum(ms) / len(ms) if ms else math.nan,
           "min": min(ms) if ms else math.nan, "max": max(ms) if ms else math.nan}
    for q in PERCENTILES:
        out[f"p{q:g}"] = percentile(ms, q)
    return out


def meets_slo(r: RequestRecord, slo: SLO) -> bool:
    if not r.ok:
        return False
    ttft, tpot = r.ttft, r.tpot
    if slo.ttft_ms is not None and (ttft is None or 1000 * ttft > slo.ttft_ms):
        return False
    return slo.tpot_ms is None or tpot is None or 1000 * tpot <= slo.tpot_ms


@dataclass(frozen=True, slots=True)
class RunStats:
    completed: int
    failed: int
    duration_s: float
    request_throughput: float
    output_token_throughput: float
    total_token_throughput: float
    goodput: float
    good_fraction: float
    ttft_ms: dict[str, float]
    tpot_ms: dict[str, float]
    itl_ms: dict[str, float]
    e2el_ms: dict[str, float]
    errors: dict[str, int]


def summarize(records: Sequence[RequestRecord], duration_s: float, slo: SLO) -> RunStats:
    ok = [r for r in records if r.ok]
    prompt = sum(r.prompt_tokens for r in ok)
    output = sum(r.output_tokens for r in ok)
    good = sum(meets_slo(r, slo) for r in records)
    per_s = 1.0 / duration_s if duration_s > 0 else math.nan
    return RunStats(
        completed=len(ok), failed=len(records) - len(ok), duration_s=duration_s,
        request_throughput=len(ok) * per_s, output_token_throughput=output * per_s,
        total_token_throughput=(prompt + output) * per_s,
        goodput=good * per_s, good_fraction=good / len(records) if records else math.nan,
        ttft_ms=distribution([t for r in ok if (t := r.ttft) is not None]),
        tpot_ms=distribution([t for r in ok if (t := r.tpot) is not None]),
        itl_ms=distribution([g for r in ok for g in r.itls()]),
        e2el_ms=distribution([r.e2el for r in ok]),
        errors=dict(Counter(r.error for r in records if not r.ok)),
    )
