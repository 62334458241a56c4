"""Helpers for end-to-end tests: one shared Ray session, real clusters (router + Serve pools + UCX).

    with running_cluster(cfg) as cl: ...      # cl.address is the router's "host:port"
    cancel_mid_stream(address, prompt)         # two tokens, then cancel: CANCELLED
    wait_free(address, within)                 # every block of both pools free (and staying free)
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import grpc
import pytest
from pdserve.v1 import router_pb2_grpc

from deploy.cluster import Cluster, LoopThread
from deploy.config import DeployConfig, parse_config
from router.client import build_request, get_status


def small_config(model_path: str, **sections: dict[str, Any]) -> DeployConfig:
    """A CPU config sized for tests: ephemeral router port, HTTP off (`router={"http": {"port": 0}}`
    turns it on), small pools, short heartbeats."""
    data: dict[str, Any] = {
        "model": {"path": model_path, "block_size": 8},
        "router": {"port": 0, "heartbeat_seconds": 0.5, "http": {"port": None}},
        "prefill": {"tensor_parallel_size": 2, "num_kv_blocks": 256, "max_num_batched_tokens": 64,
                    "resources": {"num_cpus": 0.25}},
        "decode": {"num_kv_blocks": 256, "resources": {"num_cpus": 0.25}},
        "kv_transfer": {"lease_seconds": 30, "timeout_seconds": 10},
    }
    for name, values in sections.items():
        data[name] = {**data.get(name, {}), **values}
    return parse_config(data, "test")


@dataclasses.dataclass
class RunningCluster:
    cluster: Cluster
    loop: LoopThread

    @property
    def address(self) -> str:
        return self.cluster.address


@contextmanager
def running_cluster(cfg: DeployConfig, timeout: float = 240.0) -> Iterator[RunningCluster]:
    loop = LoopThread()
    cluster = loop.run(_make(cfg))
    try:
        loop.run(cluster.start(timeout), timeout + 30)
        yield RunningCluster(cluster, loop)
    finally:
        loop.run(cluster.stop(), 120)
        loop.close()


async def _make(cfg: DeployConfig) -> Cluster:
    return Cluster(cfg)


def cancel_mid_stream(address: str, prompt: list[int] | str) -> None:
    """Starts a long greedy generation, reads two tokens, cancels the call and checks that the
    client sees CANCELLED (what freeing every block is then asserted after)."""
    with grpc.insecure_channel(address) as ch:
        call = router_pb2_grpc.RouterStub(ch).Generate(build_request(prompt, max_tokens=400, ignore_eos=True))
        next(call)
        next(call)
        call.cancel()
        with pytest.raises(grpc.RpcError) as err:
            list(call)
        assert err.value.code() == grpc.StatusCode.CANCELLED


def blocks_all_free(target: Any) -> bool:
    """Every replica of both pools reports every block free and nothing leased (target: an address
    or a router.client.Endpoint)."""
    status = get_status(target)
    replicas = list(status.prefill.replicas) + list(status.decode.replicas)
    return all(r.kv_blocks_free == r.kv_blocks_total and r.kv_blocks_leased == 0 for r in replicas)


def wait_free(target: Any, within: float, heartbeat: float = 0.5) -> float:
    """Seconds until every block is free; the state must hold across two heartbeats (not a stale one)."""
    start = time.monotonic()
    while True:
        if blocks_all_free(target):
            freed = time.monotonic() - start
            time.sleep(2 * heartbeat)
            if blocks_all_free(target):
                return freed
        if time.monotonic() - start > within:
            raise AssertionError(f"blocks not free after {within}s: {get_status(target)}")
        time.sleep(0.05)
