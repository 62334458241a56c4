"""The two pools as Ray Serve deployments, built from a DeployConfig.

Serve owns placement (a prefill replica's TP ranks are the bundles of its placement group), health
checks, restarts, graceful drain and per-pool replica counts. Requests never cross Serve: each replica
runs its own gRPC service and announces it to the router's registry with a protobuf heartbeat, so the
data path is direct and pickle-free.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import grpc
from pdserve.v1 import worker_pb2, worker_pb2_grpc
from ray import serve

from decode_worker.config import DecodeWorkerConfig
from decode_worker.replica import DecodeReplica
from deploy.config import DeployConfig, ResourcesConfig
from prefill_worker.config import PrefillWorkerConfig
from prefill_worker.replica import PrefillReplica

log = logging.getLogger(__name__)

PREFILL_APP, DECODE_APP = "pdserve-prefill", "pdserve-decode"


async def heartbeat_loop(
    registry_address: str, status: Callable[[], worker_pb2.WorkerStatus], period: float
) -> None:
    """Reports this replica to the router every `period` seconds, forever (cancel to stop)."""
    async with grpc.aio.insecure_channel(registry_address) as channel:
        stub = worker_pb2_grpc.RegistryStub(channel)
        while True:
            try:
                await stub.Heartbeat(status(), timeout=max(1.0, 2 * period))
            except grpc.aio.AioRpcError as exc:
                log.debug("heartbeat to %s failed: %s", registry_address, exc.code())
            await asyncio.sleep(period)


class _PoolReplica:
    """Shared body of both deployments: start the worker, heartbeat, stop cleanly."""

    replica: PrefillReplica | DecodeReplica

    async def _begin(self, registry: str, period: float) -> None:
        await self.replica.start()
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        self._beat = asyncio.get_running_loop().create_task(
            heartbeat_loop(registry, lambda: self.replica.status(self.replica_id), period)
        )

    async def check_health(self) -> None:
        engine = self.replica.engine
        if engine is None or engine.error is not None:
            raise RuntimeError(f"engine failed: {engine.error if engine else 'not started'}")

    def address(self) -> str:
        return self.replica.address

    async def __del__(self) -> None:
        self._beat.cancel()
        await self.replica.stop()


@serve.deployment(health_check_period_s=2, graceful_shutdown_timeout_s=10)
class PrefillDeployment(_PoolReplica):
    replica: PrefillReplica

    async def __init__(self, cfg: PrefillWorkerConfig) -> None:  # type: ignore[misc] # Serve awaits it
        self.replica = PrefillReplica(cfg)
        await self._begin(cfg.registry_address, cfg.heartbeat_seconds)

    def fail_next_pulls(self, n: int) -> None:
        """Fault injection for tests and drills: the next n KV pulls from rank 0 fail."""
        self.replica.sources[0].fail_next_pulls(n)


@serve.deployment(health_check_period_s=2, graceful_shutdown_timeout_s=10)
class DecodeDeployment(_PoolReplica):
    replica: DecodeReplica

    async def __init__(self, cfg: DecodeWorkerConfig) -> None:  # type: ignore[misc] # Serve awaits it
        self.replica = DecodeReplica(cfg)
        await self._begin(cfg.registry_address, cfg.heartbeat_seconds)


def _actor_options(res: ResourcesConfig) -> dict[str, Any]:
    options: dict[str, Any] = {"num_cpus": res.num_cpus, "num_gpus": res.num_gpus}
    if res.custom:
        options["resources"] = dict(res.custom)
    return options


def _bundle(res: ResourcesConfig) -> dict[str, float]:
    bundle = {"CPU": res.num_cpus, **dict(res.custom)}
    if res.num_gpus:
        bundle["GPU"] = res.num_gpus
    return bundle


def prefill_worker_config(cfg: DeployConfig, registry: str) -> PrefillWorkerConfig:
    p = cfg.prefill
    return PrefillWorkerConfig(
        model_path=cfg.model.path, dtype=cfg.model.dtype, tensor_parallel_size=p.tensor_parallel_size,
        block_size=cfg.model.block_size, num_kv_blocks=p.num_kv_blocks,
        max_num_batched_tokens=p.max_num_batched_tokens, torch_threads=p.torch_threads,
        device=p.device, host=cfg.kv_transfer.host, registry_address=registry,
        heartbeat_seconds=cfg.router.heartbeat_seconds, lease_seconds=cfg.kv_transfer.lease_seconds,
        kv_backend=cfg.kv_transfer.backend, rank_num_cpus=p.resources.num_cpus,
        rank_num_gpus=p.resources.num_gpus,
    )


def decode_worker_config(cfg: DeployConfig, registry: str) -> DecodeWorkerConfig:
    d = cfg.decode
    return DecodeWorkerConfig(
        model_path=cfg.model.path, dtype=cfg.model.dtype, quantization=d.quantization,
        tensor_parallel_size=d.tensor_parallel_size, block_size=cfg.model.block_size,
        num_kv_blocks=d.num_kv_blocks, max_num_seqs=d.max_num_seqs, torch_threads=d.torch_threads,
        device=d.device, host=cfg.kv_transfer.host, registry_address=registry,
        heartbeat_seconds=cfg.router.heartbeat_seconds, kv_backend=cfg.kv_transfer.backend,
        transfer_timeout_seconds=cfg.kv_transfer.timeout_seconds,
    )


def _scaling(replicas: int, autoscaling: Any) -> dict[str, Any]:
    if autoscaling is None:
        return {"num_replicas": replicas}
    return {
        "num_replicas": None,
        "autoscaling_config": {
            "min_replicas": autoscaling.min_replicas,
            "max_replicas": autoscaling.max_replicas,
            "initial_replicas": replicas,
            "upscale_delay_s": autoscaling.upscale_delay_s,
            "downscale_delay_s": autoscaling.downscale_delay_s,
        },
    }


def build_prefill_app(cfg: DeployConfig, registry: str) -> serve.Application:
    p = cfg.prefill
    options: dict[str, Any] = {
        "ray_actor_options": _actor_options(p.resources),
        **_scaling(p.replicas, p.autoscaling),
    }
    if p.tensor_parallel_size > 1:
        options["placement_group_bundles"] = [_bundle(p.resources)] * p.tensor_parallel_size
        options["placement_group_strategy"] = "PACK"
    deployment: Any = PrefillDeployment
    return deployment.options(**options).bind(prefill_worker_config(cfg, registry))


def build_decode_app(cfg: DeployConfig, registry: str) -> serve.Application:
    d = cfg.decode
    options = {"ray_actor_options": _actor_options(d.resources), **_scaling(d.replicas, d.autoscaling)}
    deployment: Any = DecodeDeployment
    return deployment.options(**options).bind(decode_worker_config(cfg, registry))
