"""CPU of a served cluster at rest (issue 14): pdserve's own processes must cost ~0.

    python benchmarks/idle_cpu.py [--requests 20] [--settle 10] [--window 30] [--out docs/figures]

For each mode (disaggregated: prefill TP=2 + decode TP=1, as deploy/examples/local-cpu.yaml; and
colocated), starts `pdserve up` in a child process, sends --requests requests, waits --settle
seconds, then sums the CPU time of every process of the cluster over --window seconds, pdserve's
processes (router, replicas, TP ranks) apart from Ray's daemons (GCS, raylet, dashboard, Serve's
controller and proxy). Goal: pdserve's processes together below 0.02 cores. Writes idle_cpu.json.

Last, the floor under that goal, measured the same way: a Ray Serve application of the same shape
whose code does nothing (two deployments of one replica each, one plain actor as a TP rank, and the
driver process in the router's place). What it costs is what Ray and Serve cost before any pdserve
code runs.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.loadgen.idle import (  # noqa: E402
    IdleReport,
    format_report,
    measure,
    pdserve_up,
    send_requests,
    serving,
)

EXAMPLE = str(Path(__file__).resolve().parents[1] / "deploy" / "examples" / "local-cpu.yaml")
MODES = {
    "disaggregated": [EXAMPLE],
    "colocated": [EXAMPLE, "--set", "serving_mode=colocated"],
}

# The floor: Serve replicas and an actor that do nothing, in pdserve's process shape.
FLOOR = """
import os, signal
import ray
from ray import serve

signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
ray.init(address="local", include_dashboard=False, logging_level="ERROR")

@serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0})
class Idle:
    async def __call__(self, request) -> str:
        return "idle"

@ray.remote(num_cpus=0)
class Rank:
    def pid(self) -> int:
        return os.getpid()

serve.run(Idle.options(name="prefill").bind(), name="prefill", route_prefix="/prefill")
serve.run(Idle.options(name="decode").bind(), name="decode", route_prefix="/decode")
rank = Rank.remote()
ray.get(rank.pid.remote())
print("listening on floor", flush=True)
signal.sigwait({signal.SIGINT})
serve.shutdown()
ray.shutdown()
"""


def _record(report: IdleReport) -> dict[str, Any]:
    return {"pdserve_cores": report.pdserve_cores, "ray_cores": report.ray_cores,
            "window_s": report.window_s, "processes": [asdict(p) for p in report.processes]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=20)
    parser.add_argument("--settle", type=float, default=10.0)
    parser.add_argument("--window", type=float, default=30.0)
    parser.add_argument("--port", type=int, default=50071)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    results = {}
    for mode, up_args in MODES.items():
        with pdserve_up([*up_args, "--set", f"router.port={args.port}"]) as (proc, address):
            tokens = send_requests(address, args.requests)
            time.sleep(args.settle)
            report = measure(proc.pid, args.window)
        print(format_report(f"{mode} ({args.requests} requests, {tokens} tokens, then {args.settle:.0f} s)",
                            report), flush=True)
        results[mode] = _record(report)
    with serving([sys.executable, "-c", FLOOR]) as (proc, _):
        time.sleep(args.settle)
        report = measure(proc.pid, args.window)
    print(format_report("floor: Ray Serve replicas and an actor that do nothing, same shape", report), flush=True)
    results["floor"] = _record(report)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "idle_cpu.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
