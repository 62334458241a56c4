"""TTFT and TPOT of the demo cluster at 1, 4 and 16 concurrent requests (issue 3), and the bench
client's capacity: it must sustain 10x the measured request rate against a null-model server
(issue 6), so the latencies above are the server's, not the client's.

    python benchmarks/serving_latency.py [--num-requests 32] [--input-len 64] [--output-len 32] [--out DIR]

1. `pdserve up` (the embedded default config: prefill TP=2, one decode replica, the default model;
   `engine.make_model` tiny when engine/default_model holds no checkpoint yet) in its own process.
2. `pdserve bench` code (benchmarks.loadgen) at concurrency 1, 4, 16: fixed-length prompts and answers.
3. A mixed workload (long-prompt/short-answer and short-prompt/long-answer) as Poisson arrivals at
   0.25, 0.5, 1 and 1.5x the rate of step 2: goodput under --slo-ttft-ms / --slo-tpot-ms.
4. The null router + null workers (the real DecodeService on a NullEngine) in their own processes;
   the bench client sends Poisson arrivals at 10x the best request rate of step 2. It sustains the
   rate when it completes >= 95% of the offered rate, with a dispatch lag p99 far below the
   latencies of step 2 and under one CPU second per second (a single asyncio thread).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.loadgen.config import SLO, BenchConfig, DatasetConfig, Load  # noqa: E402
from benchmarks.loadgen.null_cluster import null_processes  # noqa: E402
from benchmarks.loadgen.plots import write_plots  # noqa: E402
from benchmarks.loadgen.report import finite, format_table, run_json  # noqa: E402
from benchmarks.loadgen.runner import RunResult, run_bench  # noqa: E402
from deploy.config import DEFAULT_MODEL_DIR  # noqa: E402
from engine.config import load_config as load_model_config  # noqa: E402

LEVELS = (1, 4, 16)
SWEEP = (0.25, 0.5, 1.0, 1.5)  # x the best request rate at fixed concurrency


def model_dir(scratch: Path) -> str:
    if (Path(DEFAULT_MODEL_DIR) / "config.json").exists():
        return DEFAULT_MODEL_DIR
    from engine.make_model import make_model

    print("engine/default_model has no checkpoint yet: using engine.make_model tiny", file=sys.stderr)
    return str(make_model(scratch / "tiny", arch="llama", size="tiny"))


@contextmanager
def pdserve_up(model: str, timeout: float = 300.0) -> Iterator[str]:
    """`pdserve up` with the default config (router on an ephemeral port); yields its address."""
    cli = "import sys; from deploy.cli import main; sys.exit(main())"
    cmd = [sys.executable, "-c", cli, "up", "--set", "router.port=0", "--set", f"model.path={model}"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env={**os.environ, "GRPC_VERBOSITY": "ERROR"})
    try:
        for line in proc.stdout or ():
            if line.startswith("pdserve router listening on "):
                yield line.split()[4]
                break
        else:
            raise RuntimeError(f"pdserve up exited with {proc.wait()}")
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(120)
        except subprocess.TimeoutExpired:
            proc.kill()


def bench(address: str, loads: tuple[Load, ...], dataset: DatasetConfig, n: int, warmup: int,
          slo: SLO | None = None) -> list[RunResult]:
    cfg = BenchConfig(address=address, loads=loads, dataset=dataset, num_requests=n, warmup=warmup,
                      slo=slo or SLO())
    results = asyncio.run(run_bench(cfg))
    print(format_table(results), flush=True)
    return results


def client_capacity(rate: float, dataset: DatasetConfig, seconds: float) -> RunResult:
    target = 10 * rate
    n = max(100, math.ceil(target * seconds))
    with null_processes(decode="engine") as address:
        return bench(address, (Load(target),), dataset, n, warmup=20)[0]


def summary(latency: list[RunResult], capacity: RunResult, rate: float) -> dict[str, Any]:
    cap = capacity.stats
    return {
        "latency": {str(r.load.concurrency): {
            "ttft_ms_p50": r.stats.ttft_ms["p50"], "ttft_ms_p99": r.stats.ttft_ms["p99"],
            "tpot_ms_p50": r.stats.tpot_ms["p50"], "tpot_ms_p99": r.stats.tpot_ms["p99"],
            "itl_ms_p99": r.stats.itl_ms["p99"], "request_throughput": r.stats.request_throughput,
            "output_token_throughput": r.stats.output_token_throughput} for r in latency},
        "client_capacity": {
            "measured_rate": rate, "offered_rate": capacity.load.rate,
            "achieved_rate": cap.request_throughput, "achieved_fraction": cap.request_throughput / capacity.load.rate,
            "failed": cap.failed, "client_cpu_utilization": capacity.overhead.cpu_utilization,
            "dispatch_lag_ms_p99": capacity.overhead.dispatch_lag_ms["p99"],
            "loop_lag_ms_p99": capacity.overhead.loop_lag_ms["p99"],
            "null_ttft_ms_p50": cap.ttft_ms["p50"], "null_output_token_throughput": cap.output_token_throughput},
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-requests", type=int, default=32, help="per concurrency level")
    p.add_argument("--input-len", type=int, default=64)
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--sweep-requests", type=int, default=48, help="per rate of the mixed sweep")
    p.add_argument("--slo-ttft-ms", type=float, default=500.0)
    p.add_argument("--slo-tpot-ms", type=float, default=50.0)
    p.add_argument("--capacity-seconds", type=float, default=10.0, help="length of the 10x client run")
    p.add_argument("--out", default=None, help="directory for serving_latency.json and the plots")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        model = model_dir(Path(scratch))
        vocab = load_model_config(model).vocab_size
        dataset = DatasetConfig("fixed", input_len=args.input_len, output_len=args.output_len, vocab_size=vocab)
        with pdserve_up(model) as address:
            latency = bench(address, tuple(Load(concurrency=c) for c in LEVELS), dataset, args.num_requests, 4)
            rate = max(r.stats.request_throughput for r in latency)
            mixed = DatasetConfig("mixed", input_len=4 * args.input_len, output_len=2 * args.output_len,
                                  short_len=8, range_ratio=0.25, vocab_size=vocab)
            sweep = bench(address, tuple(Load(f * rate) for f in SWEEP), mixed, args.sweep_requests, 0,
                          SLO(args.slo_ttft_ms, args.slo_tpot_ms))
    capacity = client_capacity(rate, dataset, args.capacity_seconds)
    out = {"model": model, "dataset": {"input_len": args.input_len, "output_len": args.output_len},
           **summary(latency, capacity, rate)}
    out["mixed_sweep_goodput"] = [
        {"offered_rate": r.load.rate, "goodput": r.stats.goodput, "request_throughput": r.stats.request_throughput,
         "good_fraction": r.stats.good_fraction, "ttft_ms_p99": r.stats.ttft_ms["p99"],
         "tpot_ms_p99": r.stats.tpot_ms["p99"], "itl_ms_p99": r.stats.itl_ms["p99"]} for r in sweep]
    print(json.dumps(finite({k: out[k] for k in ("latency", "mixed_sweep_goodput", "client_capacity")}), indent=1))
    if args.out:
        d = Path(args.out)
        d.mkdir(parents=True, exist_ok=True)
        out["runs"] = [run_json(r, with_requests=False) for r in latency]
        out["mixed_sweep"] = [run_json(r, with_requests=False) for r in sweep]
        (d / "serving_latency.json").write_text(json.dumps(finite(out), indent=1, default=str))
        for prefix, runs in (("serving_latency", latency), ("mixed_sweep", sweep)):
            for path in write_plots(runs, d):
                path.rename(d / f"{prefix}_{path.name}")


if __name__ == "__main__":
    main()
