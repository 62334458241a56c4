"""The decode pool as colocated replicas (decode_worker/colocated.py) in Ray Serve.

`serving_mode: colocated`: no prefill pool; each replica heartbeats as a DECODE replica and, under
`<id>-prefill`, as a PREFILL replica at the same address, so the router prefills and decodes every
request on one engine. `decode.local_prefill_max_tokens > 0` (disaggregated): the decode replicas
are colocated replicas that announce only DECODE; the router keeps short prompts on them.

    decode_pool_app(cfg, registry, initial) -> the decode pool's Serve application (cluster.py)
"""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

from pdserve.v1 import worker_pb2
from ray import serve

from decode_worker.colocated import ColocatedReplica, ColocatedWorkerConfig
from deploy.config import DeployConfig
from deploy.serve_app import (
    _actor_options,
    _PoolReplica,
    build_decode_app,
    decode_worker_config,
    heartbeat_loop,
)
from engine.cpus import thread_cores

PREFILL_ID_SUFFIX = "-prefill"
DRAIN_SECONDS = 120.0  # a leaving replica gets this long to finish its generations
SHUTDOWN_MARGIN_SECONDS = 5.0


@serve.deployment(health_check_period_s=2, graceful_shutdown_timeout_s=10)
class ColocatedDeployment(_PoolReplica):
    async def __init__(self, cfg: ColocatedWorkerConfig) -> None:  # type: ignore[misc] # Serve awaits it
        self.replica = self.colocated = ColocatedReplica(cfg)
        self.drain_seconds = DRAIN_SECONDS
        self._beat_prefill: asyncio.Task[None] | None = None
        await self._begin(cfg.decode.registry_address, cfg.decode.heartbeat_seconds, cfg.decode.kv_backend)
        if cfg.announce_prefill:
            self._beat_prefill = asyncio.get_running_loop().create_task(heartbeat_loop(
                cfg.decode.registry_address, self._prefill_status, cfg.decode.heartbeat_seconds, asyncio.Event()))

    def _prefill_status(self) -> worker_pb2.WorkerStatus:
        st = self.colocated.prefill_status(self.replica_id + PREFILL_ID_SUFFIX)
        st.draining = bool(getattr(self, "draining", False))
        return st

    def reconfigure(self, live: dict[str, float]) -> None:
        """Live settings: `lease_seconds` (held prompts), `transfer_timeout_seconds` (pulls)."""
        if self.colocated.prefill_service is not None:
            self.colocated.prefill_service.lease_seconds = live["lease_seconds"]
        if self.colocated.service is not None:
            self.colocated.service.transfer_timeout = live["transfer_timeout_seconds"]

    def idle(self) -> bool:
        return self.colocated.idle()

    def local_stats(self) -> dict[str, int]:
        """How this replica's decodes got their KV: adopted in place or pulled."""
        return {"adopted": self.colocated.stats.adopted, "pulled": self.colocated.stats.pulled}

    def cores(self) -> list[list[int]]:
        """The distinct CPU sets of this process's threads (one set when pinned)."""
        return thread_cores()

    async def __del__(self) -> None:
        try:
            await super().__del__()
        finally:
            if self._beat_prefill is not None:
                self._beat_prefill.cancel()


def colocated_worker_config(cfg: DeployConfig, registry: str) -> ColocatedWorkerConfig:
    decode = decode_worker_config(cfg, registry)
    engine = dataclasses.replace(decode.engine, max_num_batched_tokens=cfg.prefill.max_num_batched_tokens)
    decode = dataclasses.replace(decode, engine=engine)
    return ColocatedWorkerConfig(decode, cfg.kv_transfer.lease_seconds,
                                 announce_prefill=cfg.serving_mode == "colocated")


def build_colocated_app(cfg: DeployConfig, registry: str) -> serve.Application:
    d, worker = cfg.decode, colocated_worker_config(cfg, registry)
    options: dict[str, Any] = {"ray_actor_options": _actor_options(d.resources)}
    return ColocatedDeployment.options(  # type: ignore[attr-defined]
        **options, num_replicas=d.replicas,
        user_config={"lease_seconds": cfg.kv_transfer.lease_seconds,
                     "transfer_timeout_seconds": cfg.kv_transfer.timeout_seconds},
        graceful_shutdown_timeout_s=DRAIN_SECONDS + SHUTDOWN_MARGIN_SECONDS,
    ).bind(worker)


def uses_colocated_replicas(cfg: DeployConfig) -> bool:
    return cfg.serving_mode == "colocated" or cfg.decode.local_prefill_max_tokens > 0


def decode_pool_app(cfg: DeployConfig, registry: str, initial: bool = True) -> serve.Application:
    """The decode pool's application: colocated replicas when the mode or the threshold asks."""
    if uses_colocated_replicas(cfg):
        return build_colocated_app(cfg, registry)
    return build_decode_app(cfg, registry, initial)
