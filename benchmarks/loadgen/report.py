"""result.json and the text summary of a benchmark."""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.loadgen.config import BenchConfig
from benchmarks.loadgen.runner import RunResult
from benchmarks.loadgen.stats import RequestRecord

METRICS = ("ttft_ms", "tpot_ms", "itl_ms", "e2el_ms")


def finite(value: Any) -> Any:
    """JSON has no inf / nan: inf -> "inf", nan -> None (recursively)."""
    if isinstance(value, float):
        return None if math.isnan(value) else ("inf" if math.isinf(value) else value)
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite(v) for v in value]
    return value


def _request_json(r: RequestRecord) -> dict[str, Any]:
    ttft, tpot = r.ttft, r.tpot
    return {
        "kind": r.kind, "prompt_tokens": r.prompt_tokens, "max_tokens": r.max_tokens,
        "output_tokens": r.output_tokens, "ok": r.ok, "error": r.error,
        "scheduled_s": r.scheduled, "sent_s": r.sent, "done_s": r.done,
        "ttft_ms": None if ttft is None else 1000 * ttft,
        "tpot_ms": None if tpot is None else 1000 * tpot,
        "e2el_ms": 1000 * r.e2el, "messages": len(r.message_times),
    }


def run_json(result: RunResult, with_requests: bool = True) -> dict[str, Any]:
    load, o = result.load, result.overhead
    out: dict[str, Any] = {
        "label": load.label, "request_rate": load.rate, "concurrency": load.concurrency,
        "num_requests": len(result.records), **dataclasses.asdict(result.stats),
        "client": {"cpu_s": o.cpu_s, "wall_s": o.wall_s, "cpu_utilization": o.cpu_utilization,
                   "dispatch_lag_ms": o.dispatch_lag_ms, "loop_lag_ms": o.loop_lag_ms},
    }
    if with_requests:
        out["requests"] = [_request_json(r) for r in result.records]
    return out


def bench_json(cfg: BenchConfig, results: Sequence[RunResult]) -> dict[str, Any]:
    return finite({"config": dataclasses.asdict(cfg) | {"api_key": None},
                    "runs": [run_json(r) for r in results]})


def write_json(path: Path, cfg: BenchConfig, results: Sequence[RunResult]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(bench_json(cfg, results), indent=1))
    return path


def format_table(results: Sequence[RunResult]) -> str:
    """One block per run: counts, throughput, goodput, then TTFT / TPOT / ITL / E2EL percentiles."""
    lines = []
    for r in results:
        s, o = r.stats, r.overhead
        lines += [
            f"== {r.load.label}: {s.completed} ok, {s.failed} failed in {s.duration_s:.2f} s"
            + (f"  errors {s.errors}" if s.errors else ""),
            f"   requests/s {s.request_throughput:9.2f}   output tok/s {s.output_token_throughput:9.1f}"
            f"   total tok/s {s.total_token_throughput:9.1f}",
            f"   goodput    {s.goodput:9.2f} req/s ({100 * s.good_fraction:.0f}% of requests met the SLO)",
            f"   {'ms':<6}{'mean':>9}{'p50':>9}{'p90':>9}{'p99':>9}",
        ]
        for name in METRICS:
            d = getattr(s, name)
            lines.append(f"   {name[:-3].upper():<6}" + "".join(f"{d[k]:9.2f}" for k in ("mean", "p50", "p90", "p99")))
        lines.append(f"   client: {o.cpu_utilization:.2f} CPU s per s, dispatch lag p99 "
                     f"{o.dispatch_lag_ms['p99']:.2f} ms, loop lag p99 {o.loop_lag_ms['p99']:.2f} ms")
    return "\n".join(lines)
