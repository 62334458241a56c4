"""Prometheus metrics of a running deployment, served by the router process (`router.metrics_port`).

Two sources, one private CollectorRegistry per Cluster (no global state):
  - RouterMetrics (the router's RequestObserver): TTFT per prefill replica, ITL and TPOT per decode
    replica, as histograms, observed as tokens stream through the router.
  - RegistryCollector: read at scrape time from the router's registry (the replicas' latest
    heartbeats): queue depth, running sequences, KV blocks in use / total / leased, draining, and the
    decode replicas' cumulative KV pulls (count, bytes, latency histogram), per pool and replica;
    plus the router's admitted requests and queued prompt tokens.

    metrics = Metrics(router)                 # before router.start(): pass metrics.observer in
    await metrics.start(host, port)           # GET http://host:port/metrics
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from router.registry import DECODE, Registry
from router.status import build_status

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class RouterMetrics:
    """TTFT / ITL / TPOT histograms (a router.observe.RequestObserver)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        def histogram(name: str, doc: str, label: str) -> Histogram:
            return Histogram(name, doc, [label], buckets=LATENCY_BUCKETS, registry=registry)

        self._ttft = histogram("pdserve_ttft_seconds", "time to first token, from admission to the "
                               "first token sent", "prefill_replica")
        self._itl = histogram("pdserve_itl_seconds", "inter-token latency (a message's gap spread "
                              "over its tokens)", "decode_replica")
        self._tpot = histogram("pdserve_tpot_seconds", "time per output token after the first, per "
                               "request", "decode_replica")

    def ttft(self, replica_id: str, seconds: float) -> None:
        self._ttft.labels(replica_id).observe(seconds)

    def itl(self, replica_id: str, seconds: float, tokens: int) -> None:
        child = self._itl.labels(replica_id)
        for _ in range(tokens):
            child.observe(seconds)

    def tpot(self, replica_id: str, seconds: float) -> None:
        self._tpot.labels(replica_id).observe(seconds)


_GAUGES = (  # (metric, help, ReplicaStatus field)
    ("pdserve_replica_running", "sequences running in the replica", "running"),
    ("pdserve_replica_queue_depth", "requests waiting in the replica", "queued"),
    ("pdserve_replica_queued_prompt_tokens", "prompt tokens not prefilled yet (prefill)",
     "queued_prompt_tokens"),
    ("pdserve_replica_kv_blocks_total", "KV blocks of the replica", "kv_blocks_total"),
    ("pdserve_replica_kv_blocks_free", "KV blocks free", "kv_blocks_free"),
    ("pdserve_replica_kv_blocks_leased", "KV blocks leased to decode (prefill)", "kv_blocks_leased"),
    ("pdserve_replica_draining", "1 while the replica is leaving (scale-down)", "draining"),
)


class RegistryCollector(Collector):
    """Per-replica gauges and KV-transfer counters from the router's registry, at scrape time."""

    def __init__(self, registry: Registry, admission: Any, loop: asyncio.AbstractEventLoop) -> None:
        self.registry = registry
        self.admission = admission
        self.loop = loop

    async def _snapshot(self) -> tuple[Any, dict[str, Any]]:
        pulls = {r.replica_id: r.status for r in self.registry.pool(DECODE)}
        return build_status(self.registry, self.admission), pulls

    def collect(self) -> Iterator[Any]:
        # the registry lives on the router's event loop: read it there, consistently
        status, pulls = asyncio.run_coroutine_threadsafe(self._snapshot(), self.loop).result(5.0)
        labels = ["pool", "replica"]
        families = {name: GaugeMetricFamily(name, doc, labels=labels) for name, doc, _ in _GAUGES}
        use = GaugeMetricFamily("pdserve_replica_kv_use", "fraction of KV blocks in use", labels=labels)
        ready = GaugeMetricFamily("pdserve_pool_ready_replicas", "replicas taking work", labels=["pool"])
        for pool_name, pool in (("prefill", status.prefill), ("decode", status.decode)):
            ready.add_metric([pool_name], pool.ready_replicas)
            for r in pool.replicas:
                for name, _, attr in _GAUGES:
                    families[name].add_metric([pool_name, r.replica_id], float(getattr(r, attr)))
                total = r.kv_blocks_total
                use.add_metric([pool_name, r.replica_id], (total - r.kv_blocks_free) / total if total else 0.0)
        yield from families.values()
        yield use
        yield ready
        yield GaugeMetricFamily("pdserve_router_inflight_requests", "admitted, not finished",
                                value=status.inflight_requests)
        yield GaugeMetricFamily("pdserve_router_queued_prompt_tokens", "admitted prompt tokens "
                                "still in prefill", value=status.queued_prompt_tokens)
        yield from _transfer_families(pulls)


def _transfer_families(pulls: dict[str, Any]) -> Iterator[Any]:
    count = CounterMetricFamily("pdserve_kv_transfer", "KV pulls by decode replicas",
                                labels=["decode_replica"])
    size = CounterMetricFamily("pdserve_kv_transfer_bytes", "KV bytes pulled by decode replicas",
                               labels=["decode_replica"])
    latency = HistogramMetricFamily("pdserve_kv_transfer_seconds", "KV pull latency (allocate -> "
                                    "every shard in place)", labels=["decode_replica"])
    for replica_id, st in pulls.items():
        count.add_metric([replica_id], st.kv_pulls)
        size.add_metric([replica_id], st.kv_pull_bytes)
        bounds, counts = list(st.kv_pull_latency_bounds), list(st.kv_pull_latency_counts)
        if bounds and len(counts) == len(bounds) + 1:
            cumulative, buckets = 0, []
            for bound, n in zip([*map(str, bounds), "+Inf"], counts, strict=True):
                cumulative += n
                buckets.append((bound, cumulative))
            latency.add_metric([replica_id], buckets, sum_value=st.kv_pull_seconds)
    yield count
    yield size
    yield latency


class Metrics:
    """The deployment's Prometheus endpoint; `observer` goes into the RouterServer."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.observer = RouterMetrics(self.registry)
        self.port = 0
        self._server: Any = None

    def attach(self, registry: Registry, admission: Any, loop: asyncio.AbstractEventLoop) -> None:
        """Scrapes read `registry` on `loop` (the router's event loop)."""
        self.registry.register(RegistryCollector(registry, admission, loop))

    async def start(self, host: str, port: int) -> int:
        """Serves /metrics on host:port (0 = a free port) from a daemon thread; returns the port."""
        self._server, _ = await asyncio.to_thread(start_http_server, port, host, self.registry)
        self.port = int(self._server.server_address[1])
        return self.port

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
