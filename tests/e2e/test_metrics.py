"""The Prometheus endpoint of a running cluster: latency histograms, queues, KV use and KV transfers."""

from __future__ import annotations

import time
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from router.client import generate
from tests.e2e import RunningCluster, running_cluster, small_config

pytestmark = pytest.mark.usefixtures("ray_session")


def _scrape(cluster: RunningCluster) -> dict[str, list[tuple[dict[str, str], float]]]:
    url = f"http://{cluster.cluster.metrics_address}/metrics"
    with urllib.request.urlopen(url, timeout=10) as resp:
        text = resp.read().decode()
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, []).append((sample.labels, sample.value))
    return out


def _total(samples: dict[str, list[tuple[dict[str, str], float]]], name: str) -> float:
    return sum(v for _, v in samples.get(name, []))


@pytest.fixture(scope="module")
def metered(hf_checkpoint: Callable[[str], Path]) -> Iterator[RunningCluster]:
    cfg = small_config(str(hf_checkpoint("llama")), router={"metrics_port": 0, "heartbeat_seconds": 1.0},
                       prefill={"tensor_parallel_size": 1})
    with running_cluster(cfg) as cl:
        yield cl


def test_metrics_endpoint_serves_histograms_with_values_after_traffic(metered: RunningCluster) -> None:
    before = _scrape(metered)
    assert _total(before, "pdserve_ttft_seconds_count") == 0
    assert {lab["pool"] for lab, _ in before["pdserve_replica_kv_blocks_total"]} == {"prefill", "decode"}

    with ThreadPoolExecutor(4) as pool:
        done = list(pool.map(lambda i: generate(metered.address, [5 + i] * (10 + i), max_tokens=8,
                                                ignore_eos=True, timeout=60), range(4)))
    assert all(len(c.token_ids) == 8 for c in done)

    deadline = time.monotonic() + 5.0  # KV-transfer counters arrive with the next heartbeat
    while True:
        after = _scrape(metered)
        if _total(after, "pdserve_kv_transfer_seconds_count") >= 4 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert _total(after, "pdserve_ttft_seconds_count") == 4
    assert _total(after, "pdserve_ttft_seconds_sum") > 0
    assert _total(after, "pdserve_tpot_seconds_count") == 4
    assert _total(after, "pdserve_itl_seconds_count") == 4 * 7  # every token after the first
    assert _total(after, "pdserve_kv_transfer_seconds_count") == 4
    assert _total(after, "pdserve_kv_transfer_bytes_total") > 0
    buckets = [(lab["le"], v) for lab, v in after["pdserve_ttft_seconds_bucket"]]
    assert ("+Inf", 4.0) in buckets and any(v < 4 for _, v in buckets)  # really distributed
    assert all(lab.get("prefill_replica") for lab, _ in after["pdserve_ttft_seconds_count"])
    assert _total(after, "pdserve_pool_ready_replicas") == 2
    assert "pdserve_replica_kv_use" in after and "pdserve_replica_queue_depth" in after
