"""Helpers for end-to-end tests: one shared Ray session, real clusters (router + Serve pools + UCX).

    with running_cluster(cfg) as cl: ...      # cl.address is the router's "host:port"
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from deploy.cluster import Cluster, LoopThread
from deploy.config import DeployConfig, parse_config


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
    import grpc
    import pytest
    from pdserve.v1 import router_pb2_grpc

    from router.client import build_request

    with grpc.insecure_channel(address) as ch:
        call = router_pb2_grpc.RouterStub(ch).Generate(build_request(prompt, max_tokens=400, ignore_eos=True))
        next(call)
        next(call)
        call.cancel()
        with pytest.raises(grpc.RpcError) as err:
            list(call)
        assert err.value.code() == grpc.StatusCode.CANCELLED
