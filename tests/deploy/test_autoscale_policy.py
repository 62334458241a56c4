"""The autoscaling policies as plain functions: load -> replicas, hysteresis, decisions reported."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import grpc
import pytest
from pdserve.v1 import router_pb2, worker_pb2_grpc

from deploy.autoscale import (
    DecodePolicy,
    PrefillPolicy,
    decode_decision,
    decode_stats,
    desire,
    prefill_decision,
    prefill_stats,
    serve_autoscaling_config,
)
from deploy.config import DecodeAutoscaling, PrefillAutoscaling
from tests.fake_workers import FakeRegistry


@pytest.mark.parametrize(("load", "current", "want"), [
    (0.0, 1, 0),    # idle: Serve's bounds keep min_replicas
    (0.5, 1, 1),
    (1.01, 1, 2),   # over the target: one more
    (3.2, 1, 4),    # far over: as many as needed at once (Serve caps at max_replicas)
    (1.7, 2, 2),    # 0.85 per replica: above 80 %, stay
    (1.5, 2, 2),    # 0.75 each on 2, but 1.5 on 1 > target: stay
    (0.7, 2, 1),    # fits one replica under 80 %: go down
    (0.0, 3, 0),
])
def test_desire(load: float, current: int, want: int) -> None:
    assert desire(load, current, "x").replicas == want


def test_prefill_scales_on_queued_prompt_tokens() -> None:
    metrics = {"queued_prompt_tokens": {"a": 1500.0, "b": 700.0}}
    d = prefill_decision(metrics, current=2, target=1000)
    assert d.replicas == 3 and "queued prompt tokens 2200" in d.reason
    assert prefill_decision({}, current=1, target=1000).replicas == 0


def test_decode_scales_on_the_larger_of_kv_and_sequence_use() -> None:
    metrics = {"kv_use": {"a": 0.9, "b": 0.1}, "seq_use": {"a": 0.5, "b": 0.6}}
    d = decode_decision(metrics, current=2, target=0.5)
    assert d.replicas == 3 and "busiest replica 0.90" in d.reason  # (0.9 + 0.6) / 0.5 = 3
    assert decode_stats(30, 100, 3, 4) == {"kv_use": 0.3, "seq_use": 0.75}
    assert prefill_stats(12) == {"queued_prompt_tokens": 12.0}


def test_serve_config_carries_bounds_delays_and_the_policy() -> None:
    scaling = DecodeAutoscaling(min_replicas=1, max_replicas=3, target=0.6, upscale_delay_s=2,
                                downscale_delay_s=9)
    cfg = serve_autoscaling_config("decode", scaling, 2, "127.0.0.1:1", heartbeat_seconds=0.5)
    assert (cfg["min_replicas"], cfg["max_replicas"], cfg["initial_replicas"]) == (1, 3, 2)
    assert (cfg["upscale_delay_s"], cfg["downscale_delay_s"]) == (2, 9)
    assert cfg["metrics_interval_s"] == 0.5 and cfg["look_back_period_s"] > cfg["metrics_interval_s"]
    assert cfg["policy"] == {"policy_function": "deploy.autoscale:DecodePolicy",
                             "policy_kwargs": {"target": 0.6, "registry": "127.0.0.1:1"}}
    from ray.serve.config import AutoscalingConfig

    AutoscalingConfig(**cfg)  # Serve accepts it as is
    live = serve_autoscaling_config("prefill", PrefillAutoscaling(), None, "", 0.5)
    assert live["initial_replicas"] is None  # a live update keeps the current count


def _ctx(target: int, metrics: dict) -> SimpleNamespace:
    return SimpleNamespace(target_num_replicas=target, aggregated_metrics=metrics)


def test_policy_reports_each_change_of_target_with_its_reason() -> None:
    async def run() -> list[router_pb2.ScalingDecision]:
        registry, server = FakeRegistry(), grpc.aio.server()
        worker_pb2_grpc.add_RegistryServicer_to_server(registry, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        policy = PrefillPolicy(target=100, registry=f"127.0.0.1:{port}")
        busy = {"queued_prompt_tokens": {"a": 250.0}}
        assert policy(_ctx(1, busy))[0] == 3          # wants 3; Serve's delay holds the target at 1
        assert policy(_ctx(1, busy))[0] == 3
        policy(_ctx(2, busy))                          # Serve moved the target: reported 1 -> 2
        policy(_ctx(2, {}))
        policy(_ctx(1, {}))                            # and back: 2 -> 1
        for _ in range(100):
            if len(registry.got) == 2:
                break
            await asyncio.sleep(0.02)
        await server.stop(None)
        return registry.got

    got = sorted(asyncio.run(run()), key=lambda d: d.time)  # two calls in flight may swap
    assert [(d.pool, d.from_replicas, d.to_replicas) for d in got] == [("prefill", 1, 2), ("prefill", 2, 1)]
    assert "queued prompt tokens 250" in got[0].reason and "queued prompt tokens 0" in got[1].reason


def test_policy_without_a_router_still_decides() -> None:
    policy = DecodePolicy(target=0.5)
    assert policy(_ctx(1, {"kv_use": {"a": 0.8}}))[0] == 2
    assert policy(_ctx(2, {"kv_use": {"a": 0.1, "b": 0.1}}))[0] == 1
