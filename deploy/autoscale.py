"""Per-pool autoscaling on Ray Serve, fed by what the replicas report.

Traffic never goes through Serve handles (direct gRPC), so Serve's own ongoing-request metric sees
no load. Instead each replica's `record_autoscaling_stats()` (deploy/serve_app.py) returns:

    prefill: {"queued_prompt_tokens": prompt tokens of Prefill calls not answered yet}
    decode:  {"kv_use": used KV blocks / total, "seq_use": open Decode calls / max_num_seqs}

Serve's controller averages each metric over `look_back_period_s` and calls the pool's policy
every control-loop tick:

    PrefillPolicy: load = sum(queued_prompt_tokens) / target           (target: tokens per replica)
    DecodePolicy:  load = sum(max(kv_use, seq_use)) / target           (target: fraction per replica)
    desired = ceil(load) to go up; to go down, the count that keeps each replica under
              DOWN_FRACTION of its target (hysteresis, so a pool at the target does not flap)

Serve wraps the policy with the YAML's upscale/downscale delays and min/max bounds. When the
pool's target count changes, the policy reports a ScalingDecision (with the reason it computed) to
the router's Registry, which `pdserve status` shows. When Serve cannot place a new replica, the
pending actor / placement group is the resource demand Ray's cluster autoscaler acts on.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import grpc
from pdserve.v1 import router_pb2, worker_pb2_grpc

log = logging.getLogger(__name__)

PREFILL_QUEUED = "queued_prompt_tokens"
DECODE_KV_USE = "kv_use"
DECODE_SEQ_USE = "seq_use"
DOWN_FRACTION = 0.8  # scale down only while the remaining replicas would stay under 80 % of target
LOOK_BACK_HEARTBEATS = 4  # metrics are averaged over this many heartbeat periods
MIN_LOOK_BACK_S = 1.0


@dataclass(frozen=True, slots=True)
class Decision:
    replicas: int
    reason: str


def desire(load: float, current: int, what: str) -> Decision:
    """How many replicas `load` (in replicas' worth of work at the target) calls for."""
    up = math.ceil(load - 1e-9)
    down = math.ceil(load / DOWN_FRACTION - 1e-9)
    if up > current:
        return Decision(up, f"{what} = {load:.2f} replicas' worth at the target > {current} replica(s)")
    if down < current:
        return Decision(max(down, 0), f"{what} = {load:.2f} replicas' worth at the target: "
                        f"{current} -> {max(down, 1)} keeps each under {DOWN_FRACTION:.0%} of it")
    return Decision(current, f"{what} = {load:.2f} replicas' worth at the target: steady")


def prefill_decision(metrics: Mapping[str, Mapping[Any, float]], current: int,
                     target: float) -> Decision:
    queued = sum(metrics.get(PREFILL_QUEUED, {}).values())
    return desire(queued / target, current, f"queued prompt tokens {queued:.0f} / target {target:g}")


def decode_decision(metrics: Mapping[str, Mapping[Any, float]], current: int,
                    target: float) -> Decision:
    kv, seqs = metrics.get(DECODE_KV_USE, {}), metrics.get(DECODE_SEQ_USE, {})
    per_replica = [max(kv.get(r, 0.0), seqs.get(r, 0.0)) for r in {*kv, *seqs}]
    busiest = max(per_replica, default=0.0)
    what = (f"KV/sequence use {sum(per_replica):.2f} (busiest replica {busiest:.2f}) "
            f"/ target {target:g}")
    return desire(sum(per_replica) / target, current, what)


class DecisionReporter:
    """Sends a ScalingDecision to the router's Registry when the pool's target count changes."""

    def __init__(self, pool: str, registry: str) -> None:
        self.pool = pool
        self.registry = registry
        self._stub: worker_pb2_grpc.RegistryStub | None = None
        self._pending: list[grpc.Future] = []  # a dropped gRPC future cancels its call: keep them
        self._target: int | None = None
        self._reason = ""

    def track(self, target: int, decision: Decision) -> None:
        """Called every tick with Serve's current target and this tick's decision."""
        if self._target is not None and target != self._target:
            self._send(self._target, target, self._reason or "replica bounds changed")
            self._reason = ""
        self._target = target
        if decision.replicas != target:
            self._reason = decision.reason

    def _send(self, before: int, after: int, reason: str) -> None:
        msg = router_pb2.ScalingDecision(pool=self.pool, time=time.time(), from_replicas=before,
                                         to_replicas=after, reason=reason)
        log.info("%s: %d -> %d replicas (%s)", self.pool, before, after, reason)
        if not self.registry:
            return
        if self._stub is None:
            self._stub = worker_pb2_grpc.RegistryStub(grpc.insecure_channel(self.registry))
        self._pending = [f for f in self._pending if not f.done()]
        # non-blocking: the Serve controller's loop must not wait on the router
        self._pending.append(self._stub.ReportScaling.future(msg, timeout=2.0))


class PrefillPolicy:
    """Serve autoscaling policy of the prefill pool (instantiated by Serve with policy_kwargs)."""

    def __init__(self, target: float, registry: str = "") -> None:
        self.target = float(target)
        self.reporter = DecisionReporter("prefill", registry)

    def __call__(self, ctx: Any) -> tuple[int, dict[str, Any]]:
        decision = prefill_decision(ctx.aggregated_metrics or {}, ctx.target_num_replicas, self.target)
        self.reporter.track(ctx.target_num_replicas, decision)
        return decision.replicas, {}


class DecodePolicy:
    """Serve autoscaling policy of the decode pool (instantiated by Serve with policy_kwargs)."""

    def __init__(self, target: float, registry: str = "") -> None:
        self.target = float(target)
        self.reporter = DecisionReporter("decode", registry)

    def __call__(self, ctx: Any) -> tuple[int, dict[str, Any]]:
        decision = decode_decision(ctx.aggregated_metrics or {}, ctx.target_num_replicas, self.target)
        self.reporter.track(ctx.target_num_replicas, decision)
        return decision.replicas, {}


def serve_autoscaling_config(pool: str, scaling: Any, initial: int | None, registry: str,
                             heartbeat_seconds: float) -> dict[str, Any]:
    """Serve's `autoscaling_config` for one pool. `initial`: replicas at first deploy; None on a
    live update (keeps the current count instead of resetting it)."""
    policy = PrefillPolicy if pool == "prefill" else DecodePolicy
    return {
        "min_replicas": scaling.min_replicas,
        "max_replicas": scaling.max_replicas,
        "initial_replicas": initial,
        "upscale_delay_s": scaling.upscale_delay_s,
        "downscale_delay_s": scaling.downscale_delay_s,
        "metrics_interval_s": heartbeat_seconds,  # how often replicas push their metrics
        "look_back_period_s": max(MIN_LOOK_BACK_S, LOOK_BACK_HEARTBEATS * heartbeat_seconds),
        "policy": {
            "policy_function": f"{__name__}:{policy.__name__}",
            "policy_kwargs": {"target": float(scaling.target), "registry": registry},
        },
    }


def prefill_stats(queued_prompt_tokens: int) -> dict[str, float]:
    """What a prefill replica reports to Serve (record_autoscaling_stats)."""
    return {PREFILL_QUEUED: float(queued_prompt_tokens)}


def decode_stats(blocks_used: int, blocks_total: int, open_calls: int, max_num_seqs: int) -> dict[str, float]:
    """What a decode replica reports to Serve (record_autoscaling_stats)."""
    return {
        DECODE_KV_USE: blocks_used / blocks_total if blocks_total else 0.0,
        DECODE_SEQ_USE: open_calls / max_num_seqs if max_num_seqs else 0.0,
    }
