"""A two-node Ray cluster on this machine: each pool lands on its node group.

`ray start --head` with `{"prefill_node": 4}` and a second `ray start --address` with
`{"decode_node": 4}`, both on loopback, with every port picked free and a private temp dir (other
Ray instances on the machine are left alone). The scenario runs in a subprocess (`python -m
tests.e2e.test_multinode MODEL_DIR`) because this pytest process may already be a driver of the
session's local Ray. Each `ray start --block` is our own process group, stopped with SIGTERM.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
PORT_FLAGS = ("--node-manager-port", "--object-manager-port", "--metrics-export-port",
              "--runtime-env-agent-port", "--dashboard-agent-grpc-port", "--dashboard-agent-listen-port")


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _ray_start(extra: list[str], resources: dict[str, float], env: dict[str, str]) -> subprocess.Popen[bytes]:
    ports = _free_ports(len(PORT_FLAGS))
    cmd = ["ray", "start", "--block", "--node-ip-address=127.0.0.1", "--num-cpus=2", "--num-gpus=0",
           f"--resources={json.dumps(resources)}", "--disable-usage-stats",
           *[f"{flag}={port}" for flag, port in zip(PORT_FLAGS, ports, strict=True)], *extra]
    return subprocess.Popen(cmd, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM to our `ray start --block` process group, then SIGKILL to what is left of it."""
    for sig, grace in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            try:
                os.killpg(proc.pid, 0)  # anything left in the group?
            except ProcessLookupError:
                return
            proc.poll()
            time.sleep(0.2)


@contextmanager
def two_node_ray(temp_dir: str) -> Iterator[str]:
    """Head {"prefill_node": 4} + worker {"decode_node": 4}; yields the GCS address, with this
    process connected to it as a driver."""
    import ray

    gcs, client = _free_ports(2)
    head = _ray_start(["--head", f"--port={gcs}", f"--ray-client-server-port={client}",
                       "--include-dashboard=false", f"--temp-dir={temp_dir}"],
                      {"prefill_node": 4}, ray_env())
    procs = [head]
    try:
        address = f"127.0.0.1:{gcs}"
        _connect(address, head)
        procs.append(_ray_start([f"--address={address}"], {"decode_node": 4}, ray_env()))
        _wait_nodes(2, procs[-1])
        yield address
    finally:
        ray.shutdown()
        for proc in reversed(procs):
            _stop(proc)


def ray_env() -> dict[str, str]:
    """Token auth (Ray 2.60's default) with the user's token, for every process of this cluster; this
    interpreter's bin first on PATH, so `ray` is the venv's even when the venv is not activated."""
    path = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])
    return {**os.environ, "PATH": path, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token"}


def _connect(address: str, head: subprocess.Popen[bytes], within: float = 120.0) -> None:
    import ray

    deadline = time.monotonic() + within
    while True:
        if head.poll() is not None:
            raise RuntimeError(f"ray start --head exited with {head.returncode}")
        try:
            ray.init(address=address, namespace="pdserve-multinode", log_to_driver=False)
            return
        except (ConnectionError, RuntimeError):
            if time.monotonic() > deadline:
                raise
            time.sleep(1.0)


def _wait_nodes(n: int, proc: subprocess.Popen[bytes], within: float = 120.0) -> None:
    import ray

    deadline = time.monotonic() + within
    while sum(node["Alive"] for node in ray.nodes()) < n:
        if proc.poll() is not None:
            raise RuntimeError(f"ray start exited with {proc.returncode}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{n} Ray nodes not up after {within}s")
        time.sleep(0.5)


def _placement(apps: dict[str, Any]) -> dict[str, set[str]]:
    """pool -> the custom node-group resources of the nodes its replicas run on."""
    import ray

    groups = {n["NodeID"]: {k for k in n["Resources"] if k.endswith("_node")} for n in ray.nodes() if n["Alive"]}
    out: dict[str, set[str]] = {}
    for app, pool in (("pdserve-prefill", "prefill"), ("pdserve-decode", "decode")):
        for dep in apps[app]["deployments"].values():
            for replica in dep["replicas"]:
                out.setdefault(pool, set()).update(groups[replica["node_id"]])
    return out


async def _scenario(address: str, model: str) -> dict[str, Any]:
    from ray.serve.context import _get_global_client

    from deploy.cluster import Cluster
    from router.client import generate
    from tests.e2e import small_config

    cfg = small_config(model, ray={"address": address, "namespace": "pdserve-multinode"},
                       router={"heartbeat_seconds": 1.0},  # a loaded machine must not lose a replica
                       prefill={"tensor_parallel_size": 1, "resources": {"num_cpus": 0.25, "custom": {"prefill_node": 1}}},
                       decode={"resources": {"num_cpus": 0.25, "custom": {"decode_node": 1}}})
    cluster = Cluster(cfg)
    await cluster.start(240)
    try:
        done = await asyncio.to_thread(generate, cluster.address, [3, 1, 4, 1, 5, 9, 2, 6], max_tokens=6,
                                       ignore_eos=True, timeout=60)
        client = _get_global_client()
        assert client is not None
        apps = client.get_serve_details()["applications"]
        return {"tokens": len(done.token_ids), "placement": {k: sorted(v) for k, v in _placement(apps).items()}}
    finally:
        await cluster.stop()


def main(model: str) -> None:
    with tempfile.TemporaryDirectory(prefix="pdserve-ray-", dir="/tmp") as temp_dir:
        with two_node_ray(temp_dir) as address:
            result = asyncio.run(_scenario(address, model))
    print("RESULT " + json.dumps(result), flush=True)


def test_each_pool_lands_on_its_node_group(hf_checkpoint: Callable[[str], Path]) -> None:
    model = str(hf_checkpoint("llama"))
    out = subprocess.run([sys.executable, "-m", "tests.e2e.test_multinode", model], cwd=REPO, env=ray_env(),
                         capture_output=True, text=True, timeout=540)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
    assert out.returncode == 0 and lines, f"scenario failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    result = json.loads(lines[-1].removeprefix("RESULT "))
    assert result["tokens"] == 6
    assert result["placement"] == {"prefill": ["prefill_node"], "decode": ["decode_node"]}



def _group_resources(manifest: dict[str, Any]) -> dict[str, dict[str, float]]:
    """KubeRay worker group -> the custom resources its `ray start` advertises (+ GPUs per pod)."""
    out = {}
    for group in manifest["spec"]["workerGroupSpecs"]:
        params = group["rayStartParams"]
        res = json.loads(json.loads(params["resources"]))  # KubeRay wants a quoted JSON string
        out[group["groupName"]] = {**res, "GPU": float(params["num-gpus"])}
    return out


def test_manifests_send_each_pool_to_its_node_group() -> None:
    import yaml

    from deploy.config import parse_config

    k8s = REPO / "deploy" / "k8s"
    cluster = yaml.safe_load((k8s / "raycluster.yaml").read_text())
    config_map = yaml.safe_load((k8s / "pdserve-config.yaml").read_text())
    cfg = parse_config(yaml.safe_load(config_map["data"]["config.yaml"]), "pdserve-config.yaml")
    launcher = yaml.safe_load((REPO / "deploy" / "ray-cluster.yaml").read_text())["available_node_types"]
    groups = _group_resources(cluster)
    for name, pool, node_type in (("prefill", cfg.prefill, "prefill_8xh100"),
                                  ("decode", cfg.decode, "decode_8xh100")):
        wanted = dict(pool.resources.custom)
        assert wanted == {f"{name}_node": 1.0}
        assert f"{name}_node" in groups[name] and all(f"{other}_node" not in groups[name]
                                                      for other in ("prefill", "decode") if other != name)
        assert f"{name}_node" in launcher[node_type]["resources"]
        # one replica (its TP group) fits in one pod / node
        assert pool.tensor_parallel_size * pool.resources.num_gpus <= groups[name]["GPU"]
        assert pool.autoscaling is not None
    assert cfg.ray.address == "auto" and cfg.router.metrics_port == 9090

if __name__ == "__main__":
    main(sys.argv[1])
