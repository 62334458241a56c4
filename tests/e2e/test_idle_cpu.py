"""A served cluster at rest costs ~0 CPU (issue 14): `pdserve up` as a user runs it, a few requests,
then pdserve's own processes (router, replicas, TP ranks; Ray's daemons apart) must stay below 0.15
cores together over 10 s. Before the fix an idle prefill replica and its second TP rank each spun
~0.5 core awaiting UCX receives. benchmarks/idle_cpu.py measures the same thing longer (goal 0.02).
"""

from __future__ import annotations

import socket
import time
from pathlib import Path

from benchmarks.loadgen.idle import format_report, measure, pdserve_up, send_requests

EXAMPLE = Path(__file__).resolve().parents[2] / "deploy" / "examples" / "local-cpu.yaml"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_an_idle_cluster_costs_almost_no_cpu() -> None:
    with pdserve_up([str(EXAMPLE), "--set", f"router.port={_free_port()}"]) as (proc, address):
        assert send_requests(address, 5) > 0
        time.sleep(3.0)  # the last requests' tails (leases released, heartbeats) settle
        report = measure(proc.pid, 10.0)
    print(format_report("idle cluster", report))
    names = " ".join(p.name for p in report.processes if p.pdserve)
    assert "PrefillRank" in names and "DecodeDeployment" in names, names  # we measured the cluster
    assert report.pdserve_cores < 0.15, format_report("idle cluster", report)
