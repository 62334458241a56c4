"""`pdserve bench` against a real cluster (router + Ray Serve pools + KV over UCX) with a tiny workload."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from benchmarks.loadgen.cli import main as bench_main
from tests.deploy.test_bench import check_png, check_run
from tests.e2e import running_cluster, small_config

pytestmark = pytest.mark.usefixtures("ray_session")


def test_bench_against_a_real_cluster(hf_checkpoint: Callable[[str], Path], tmp_path: Path) -> None:
    cfg = small_config(str(hf_checkpoint("llama")), prefill={"tensor_parallel_size": 1})
    out = tmp_path / "bench"
    with running_cluster(cfg) as cluster:
        rc = bench_main(["--address", cluster.address, "--concurrency", "1,4", "--num-requests", "6",
                         "--warmup", "2", "--dataset", "uniform", "--input-len", "16",
                         "--output-len", "6", "--vocab", "1000", "--slo-ttft-ms", "60000",
                         "--slo-tpot-ms", "60000", "--out", str(out), "--no-progress"])
    assert rc == 0
    result = json.loads((out / "result.json").read_text())
    assert [r["concurrency"] for r in result["runs"]] == [1, 4]
    for run in result["runs"]:
        check_run(run, 6)
        assert run["goodput"] == pytest.approx(run["request_throughput"])
    check_png(out / "latency_cdf.png")
    check_png(out / "goodput_vs_concurrency.png")
