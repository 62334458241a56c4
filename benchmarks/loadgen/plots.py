"""PNG plots (matplotlib, Agg backend): latency CDFs per run, goodput and throughput vs load."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from benchmarks.loadgen.runner import RunResult  # noqa: E402

CDF_METRICS = ("TTFT", "TPOT", "ITL")


def _samples(result: RunResult, metric: str) -> list[float]:
    ok = [r for r in result.records if r.ok]
    if metric == "TTFT":
        return [1000 * t for r in ok if (t := r.ttft) is not None]
    if metric == "TPOT":
        return [1000 * t for r in ok if (t := r.tpot) is not None]
    return [1000 * g for r in ok for g in r.itls()]


def latency_cdfs(results: Sequence[RunResult], path: Path) -> Path:
    """One panel per metric, one curve per run."""
    fig, axes = plt.subplots(1, len(CDF_METRICS), figsize=(5 * len(CDF_METRICS), 4))
    for ax, metric in zip(axes, CDF_METRICS, strict=True):
        for r in results:
            xs = sorted(_samples(r, metric))
            if xs:
                ys = [(i + 1) / len(xs) for i in range(len(xs))]
                ax.step(xs, ys, where="post", label=r.load.label)
        lo, hi = ax.dataLim.x0, ax.dataLim.x1
        if ax.has_data() and lo > 0 and hi / lo > 100:  # long tails: a log axis keeps the body visible
            ax.set_xscale("log")
        ax.set_xlabel(f"{metric} (ms)")
        ax.set_ylabel("fraction of samples")
        ax.set_title(f"{metric} CDF")
        ax.grid(alpha=0.3)
        if ax.has_data():
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _load_axis(results: Sequence[RunResult]) -> tuple[list[float], str]:
    if all(not math.isinf(r.load.rate) for r in results):
        return [r.load.rate for r in results], "offered request rate (req/s)"
    return [float(r.load.concurrency or len(r.records)) for r in results], "concurrent requests"


def goodput_vs_load(results: Sequence[RunResult], path: Path) -> Path:
    """Goodput and request throughput against the offered rate (or the concurrency)."""
    xs, xlabel = _load_axis(results)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(xs, [r.stats.request_throughput for r in results], "o-", label="throughput (req/s)")
    ax.plot(xs, [r.stats.goodput for r in results], "s-", label="goodput (req/s meeting the SLO)")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("requests/s")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_plots(results: Sequence[RunResult], out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [latency_cdfs(results, out_dir / "latency_cdf.png")]
    if len(results) > 1:
        by_rate = all(not math.isinf(r.load.rate) for r in results)
        name = "goodput_vs_rate.png" if by_rate else "goodput_vs_concurrency.png"
        paths.append(goodput_vs_load(results, out_dir / name))
    return paths
