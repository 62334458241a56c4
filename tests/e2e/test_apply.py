"""`pdserve apply` on a running cluster: live changes take effect, nothing restarts, no request fails."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from deploy.apply import apply, plan_apply
from deploy.config import ConfigError, DeployConfig
from deploy.serve_app import DECODE_APP, PREFILL_APP
from router.client import get_status
from tests.e2e import RunningCluster, running_cluster, small_config
from tests.e2e.test_autoscale import HEARTBEAT, SCALE_UP_WITHIN, Load, _wait_for

pytestmark = pytest.mark.usefixtures("ray_session")


def test_plan_sorts_keys_into_live_pool_and_refused() -> None:
    plan = plan_apply(["router.max_inflight", "decode.autoscaling.max_replicas",
                       "kv_transfer.lease_seconds"])
    assert plan.router and plan.pools == ("prefill", "decode") and not plan.refused
    plan = plan_apply(["prefill.num_kv_blocks", "router.port", "model.dtype", "ray.namespace",
                       "serving_mode", "decode.local_prefill_max_tokens"])
    assert plan.pools == ("prefill", "decode")
    assert plan.refused == ("router.port", "model.dtype", "ray.namespace", "serving_mode",
                            "decode.local_prefill_max_tokens")


def _write(path: Path, cfg: DeployConfig, **changes: Any) -> Path:
    data = cfg.to_dict()
    for key, value in changes.items():
        node = data
        *parents, leaf = key.split("__")
        for name in parents:
            node = node[name]
        node[leaf] = value
    path.write_text(yaml.safe_dump(data))
    return path


def _deployment(app: str) -> dict[str, Any]:
    from ray.serve.context import _get_global_client

    client = _get_global_client()
    assert client is not None
    details = client.get_serve_details()
    deployments: dict[str, Any] = details["applications"][app]["deployments"]
    return next(iter(deployments.values()))


def _replica_ids(address: str) -> set[str]:
    st = get_status(address)
    return {r.replica_id for r in [*st.prefill.replicas, *st.decode.replicas]}


@pytest.fixture(scope="module")
def applied(hf_checkpoint: Callable[[str], Path]) -> Iterator[RunningCluster]:
    cfg = small_config(
        str(hf_checkpoint("llama")),
        router={"heartbeat_seconds": HEARTBEAT},
        prefill={"tensor_parallel_size": 1},
        decode={"num_kv_blocks": 128, "max_num_seqs": 4,
                "autoscaling": {"min_replicas": 1, "max_replicas": 1, "target": 0.5,
                                "upscale_delay_s": 1.0, "downscale_delay_s": 3.0}},
    )
    with running_cluster(cfg) as cl:
        yield cl


def test_apply_new_max_replicas_takes_effect_without_failed_requests(
        applied: RunningCluster, tmp_path: Path) -> None:
    address, cfg = applied.address, applied.cluster.cfg
    before = _replica_ids(address)
    load = Load(address, prompt_len=8, max_tokens=60, threads=6).start()
    try:
        path = _write(tmp_path / "new.yaml", cfg, decode__autoscaling__max_replicas=2,
                      kv_transfer__lease_seconds=20.0, router__max_inflight=100)
        assert apply(str(path), timeout=120) == 0
        assert _deployment(DECODE_APP)["deployment_config"]["autoscaling_config"]["max_replicas"] == 2
        assert applied.cluster.router.deps.admission.max_inflight == 100
        from ray import serve

        assert serve.get_app_handle(PREFILL_APP).lease_seconds.remote().result() == 20.0
        assert before <= _replica_ids(address), "a replica restarted"
        _wait_for(address, (1, 2), SCALE_UP_WITHIN, [])  # the new bound lets decode grow under load
    finally:
        load.stop()
    assert not load.errors, f"{len(load.errors)} requests failed: {load.errors[:3]}"
    assert load.done > 0


def test_apply_refuses_what_needs_a_restart_and_bad_files(applied: RunningCluster, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    cfg = applied.cluster.cfg
    assert apply(str(_write(tmp_path / "port.yaml", cfg, router__port=1234)), timeout=60) == 1
    assert "router.port: cannot change on a running deployment" in capsys.readouterr().out
    assert applied.cluster.cfg == cfg
    (tmp_path / "bad.yaml").write_text("decode:\n  autoscaling:\n    max_replica: 3\n")
    with pytest.raises(ConfigError, match="decode.autoscaling.max_replica: unknown key"):
        apply(str(tmp_path / "bad.yaml"))
    # A namespace where no `pdserve up` runs: refused with a message that says so, nothing waits.
    assert apply(str(_write(tmp_path / "elsewhere.yaml", cfg, ray__namespace="nobody-here")), timeout=60) == 1
    assert "no running pdserve in Ray namespace 'nobody-here'" in capsys.readouterr().out
