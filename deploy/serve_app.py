"""The two pools as Ray Serve deployments, built from a DeployConfig.

Serve owns placement (a replica's TP ranks, prefill or decode, are the bundles of its placement group), health
checks, restarts, graceful drain and per-pool replica counts. Requests never cross Serve: each replica
runs its own gRPC service and announces it to the router's registry with a protobuf heartbeat, so the
data path is direct and pickle-free.

A replica's life:
  1. `__init__`: start the worker, heartbeat to the router (the router starts picking it).
  2. `reconfigure(user_config)`: live settings (KV lease, transfer timeout); Serve calls it after
     `__init__` and on every `pdserve apply` that changes them, without a restart.
  3. `record_autoscaling_stats()`: the load the pool's policy scales on (deploy/autoscale.py).
  4. `__del__` (scale-down, redeploy, shutdown): report `draining` at once (the router stops
     picking it), let calls already routed here arrive (not when the router has stopped: then none
     can), wait until every call is answered and every KV block is free (bounded by the drain
     timeout), then stop.

Deployments carry an explicit version: a hash of what needs a restart (the worker config minus the
live settings, Ray resources). Re-deploying with the same version only updates replica counts,
autoscaling and `user_config`, so `pdserve apply` of such changes restarts nothing.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import logging
import time
from collections.abc import Callable
from typing import Any

import grpc
from pdserve.v1 import worker_pb2, worker_pb2_grpc
from ray import serve

from decode_worker.config import DecodeWorkerConfig
from decode_worker.replica import DecodeReplica
from deploy.autoscale import decode_stats, prefill_stats, serve_autoscaling_config
from deploy.config import DeployConfig
from deploy.schema import DecodeSection, PrefillSection, ResourcesSection
from engine.config import EngineConfig
from kv_transfer import serve_on_running_loop
from kv_transfer.faults import fail_next_pulls
from prefill_worker.config import PrefillWorkerConfig
from prefill_worker.replica import PrefillReplica

log = logging.getLogger(__name__)

PREFILL_APP, DECODE_APP = "pdserve-prefill", "pdserve-decode"
DRAIN_HEARTBEATS = 2  # after announcing `draining`, calls the router already sent may still arrive
DECODE_DRAIN_SECONDS = 120.0  # a leaving decode replica gets this long to finish its generations
DRAIN_MARGIN_SECONDS = 2.0  # of Serve's graceful_shutdown_timeout_s, kept for stopping


async def heartbeat_loop(registry_address: str, status: Callable[[], worker_pb2.WorkerStatus],
                         period: float, wake: asyncio.Event) -> None:
    """Reports this replica to the router every `period` seconds (or at once when `wake` is set),
    forever (cancel to stop)."""
    async with grpc.aio.insecure_channel(registry_address) as channel:
        stub = worker_pb2_grpc.RegistryStub(channel)
        while True:
            try:
                await stub.Heartbeat(status(), timeout=max(1.0, 2 * period))
            except grpc.aio.AioRpcError as exc:
                log.debug("heartbeat to %s failed: %s", registry_address, exc.code())
            try:
                await asyncio.wait_for(wake.wait(), period)
            except TimeoutError:
                pass
            wake.clear()


async def router_listening(registry_address: str, status: worker_pb2.WorkerStatus, timeout: float) -> bool:
    """One heartbeat; False when nothing listens at the registry (the router has stopped)."""
    async with grpc.aio.insecure_channel(registry_address) as channel:
        try:
            await worker_pb2_grpc.RegistryStub(channel).Heartbeat(status, timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            return exc.code() != grpc.StatusCode.UNAVAILABLE
    return True


async def check_ranks(followers: list[Any], timeout: float = 10.0) -> None:
    """Raises when a TP follower rank's process died (Ray raises) or its step loop ended, so Serve
    restarts the replica before a request finds out."""
    alive = await asyncio.wait_for(asyncio.gather(*(f.alive.remote() for f in followers)), timeout)
    stopped = [rank for rank, ok in enumerate(alive, 1) if not ok]
    if stopped:
        raise RuntimeError(f"TP rank(s) {stopped} stopped")


class _PoolReplica:
    """Shared body of both deployments: start the worker, heartbeat, drain and stop cleanly."""

    replica: PrefillReplica | DecodeReplica
    drain_seconds: float

    async def _begin(self, registry: str, period: float, kv_backend: str) -> None:
        self.draining = False
        self.period = period
        self.registry = registry
        self._wake = asyncio.Event()
        serve_on_running_loop(kv_backend)  # this replica's loop lives as long as its process
        await self.replica.start()
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        self._beat = asyncio.get_running_loop().create_task(
            heartbeat_loop(registry, self._status, period, self._wake)
        )

    def _status(self) -> worker_pb2.WorkerStatus:
        st = self.replica.status(self.replica_id)
        st.draining = self.draining
        return st

    async def check_health(self) -> None:
        engine = self.replica.engine
        if engine is None or engine.error is not None:
            raise RuntimeError(f"engine failed: {engine.error if engine else 'not started'}")
        await check_ranks(self.replica.followers)

    def address(self) -> str:
        return self.replica.address

    def idle(self) -> bool:
        raise NotImplementedError

    async def drain(self) -> bool:
        """Stop taking work, finish what runs; True when idle before the drain timeout."""
        self.draining = True
        if await router_listening(self.registry, self._status(), max(1.0, 2 * self.period)):
            await asyncio.sleep(DRAIN_HEARTBEATS * self.period)  # a stopped router sends nothing more
        deadline = time.monotonic() + self.drain_seconds
        while not self.idle():
            if time.monotonic() > deadline:
                log.warning("replica %s: drain timed out with work left", self.replica_id)
                return False
            await asyncio.sleep(0.05)
        return True

    async def __del__(self) -> None:
        await self.drain()
        self._beat.cancel()
        await self.replica.stop()


class PrefillReplicaActor(_PoolReplica):
    async def __init__(self, cfg: PrefillWorkerConfig) -> None:  # type: ignore[misc] # Serve awaits it
        self.replica = self.prefill = PrefillReplica(cfg)
        self.drain_seconds = cfg.lease_seconds
        await self._begin(cfg.registry_address, cfg.heartbeat_seconds, cfg.kv_backend)

    def reconfigure(self, live: dict[str, float]) -> None:
        """Live settings: `lease_seconds` (KV kept for the pull)."""
        self.drain_seconds = live["lease_seconds"]
        if self.prefill.service is not None:
            self.prefill.service.lease_seconds = live["lease_seconds"]

    def lease_seconds(self) -> float:
        return self.prefill.service.lease_seconds if self.prefill.service else 0.0

    def idle(self) -> bool:
        service = self.prefill.service
        return service is None or (service.queued_prompt_tokens == 0 and not service.leases)

    def record_autoscaling_stats(self) -> dict[str, float]:
        service = self.prefill.service
        return prefill_stats(service.queued_prompt_tokens if service else 0)

    def fail_next_pulls(self, n: int) -> None:
        """Fault injection for tests and drills: the next n KV pulls from rank 0 fail."""
        fail_next_pulls(self.prefill.sources[0], n)

    async def held_requests(self) -> list[dict[str, Any]]:
        """Diagnostics (leak hunts): every request the prefill engine still knows, with its blocks and
        whether the service holds a lease for it or is still answering its Prefill call."""
        service, engine = self.prefill.service, self.prefill.engine
        if service is None or engine is None:
            return []
        return [{"request_id": row.request_id, "status": row.status, "blocks": row.blocks,
                 "leased": row.request_id in service.leases, "running": row.request_id in service.running,
                 "unwanted": row.request_id in service.unwanted}
                for row in await engine.request_rows()]


class DecodeReplicaActor(_PoolReplica):
    async def __init__(self, cfg: DecodeWorkerConfig) -> None:  # type: ignore[misc] # Serve awaits it
        self.replica = self.decode = DecodeReplica(cfg)
        self.drain_seconds = DECODE_DRAIN_SECONDS
        self.max_num_seqs = cfg.engine.max_num_seqs
        await self._begin(cfg.registry_address, cfg.heartbeat_seconds, cfg.kv_backend)

    def reconfigure(self, live: dict[str, float]) -> None:
        """Live settings: `transfer_timeout_seconds` (decode gives up on a pull after it)."""
        if self.decode.service is not None:
            self.decode.service.transfer_timeout = live["transfer_timeout_seconds"]

    def idle(self) -> bool:
        return self.decode.service is None or not self.decode.service.active

    def record_autoscaling_stats(self) -> dict[str, float]:
        engine, service = self.decode.engine, self.decode.service
        if engine is None or service is None:
            return decode_stats(0, 0, 0, self.max_num_seqs)
        used = engine.num_total_blocks - engine.num_free_blocks
        return decode_stats(used, engine.num_total_blocks, len(service.active), self.max_num_seqs)


# The Serve deployments (typed as Any: Serve's decorator returns a Deployment, which mypy cannot see).
PrefillDeployment: Any = serve.deployment(name="PrefillDeployment", health_check_period_s=2)(PrefillReplicaActor)
DecodeDeployment: Any = serve.deployment(name="DecodeDeployment", health_check_period_s=2)(DecodeReplicaActor)


def _actor_options(res: ResourcesSection) -> dict[str, Any]:
    options: dict[str, Any] = {"num_cpus": res.num_cpus, "num_gpus": res.num_gpus}
    if res.custom:
        options["resources"] = dict(res.custom)
    return options


def _bundle(res: ResourcesSection) -> dict[str, float]:
    bundle = {"CPU": res.num_cpus, **dict(res.custom)}
    if res.num_gpus:
        bundle["GPU"] = res.num_gpus
    return bundle


def prefill_engine_config(cfg: DeployConfig) -> EngineConfig:
    m, p = cfg.model, cfg.prefill
    return EngineConfig(model=m.path, dtype=m.dtype, block_size=m.block_size, num_blocks=p.num_kv_blocks,
                        max_num_batched_tokens=p.max_num_batched_tokens, device=p.device)


def decode_engine_config(cfg: DeployConfig) -> EngineConfig:
    m, d = cfg.model, cfg.decode
    return EngineConfig(model=m.path, dtype=m.dtype, block_size=m.block_size, num_blocks=d.num_kv_blocks,
                        max_num_seqs=d.max_num_seqs, quantization=d.quantization, device=d.device)


def prefill_worker_config(cfg: DeployConfig, registry: str) -> PrefillWorkerConfig:
    p = cfg.prefill
    return PrefillWorkerConfig(
        prefill_engine_config(cfg),
        tensor_parallel_size=p.tensor_parallel_size, torch_threads=p.torch_threads,
        host=cfg.kv_transfer.host, registry_address=registry,
        heartbeat_seconds=cfg.router.heartbeat_seconds, lease_seconds=cfg.kv_transfer.lease_seconds,
        kv_backend=cfg.kv_transfer.backend, rank_num_cpus=p.resources.num_cpus,
        rank_num_gpus=p.resources.num_gpus, cpu_affinity=p.cpu_affinity,
    )


def decode_worker_config(cfg: DeployConfig, registry: str) -> DecodeWorkerConfig:
    d = cfg.decode
    return DecodeWorkerConfig(
        decode_engine_config(cfg),
        tensor_parallel_size=d.tensor_parallel_size, torch_threads=d.torch_threads,
        host=cfg.kv_transfer.host, registry_address=registry,
        heartbeat_seconds=cfg.router.heartbeat_seconds, kv_backend=cfg.kv_transfer.backend,
        kv_same_host_read=cfg.kv_transfer.same_host_read,
        transfer_timeout_seconds=cfg.kv_transfer.timeout_seconds, cpu_affinity=d.cpu_affinity,
        rank_num_cpus=d.resources.num_cpus, rank_num_gpus=d.resources.num_gpus,
    )


def version_of(worker: Any, live: tuple[str, ...], options: dict[str, Any]) -> str:
    """What forces a restart: the worker config without its live fields, and the Ray options."""
    fixed = dataclasses.replace(worker, **{name: 0.0 for name in live})
    text = json.dumps([dataclasses.asdict(fixed), options], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _scaling(pool: str, replicas: int, autoscaling: Any, registry: str, cfg: DeployConfig,
             initial: bool) -> dict[str, Any]:
    if autoscaling is None:
        return {"num_replicas": replicas}
    start = replicas if initial else None
    return {"num_replicas": None, "autoscaling_config": serve_autoscaling_config(
        pool, autoscaling, start, registry, cfg.router.heartbeat_seconds)}


def build_prefill_app(cfg: DeployConfig, registry: str, initial: bool = True) -> serve.Application:
    """initial=False: a live update (autoscaling keeps the current replica count)."""
    live = {"lease_seconds": cfg.kv_transfer.lease_seconds}
    drain = cfg.kv_transfer.lease_seconds
    return _pool_app(PrefillDeployment, "prefill", cfg.prefill, prefill_worker_config(cfg, registry), live, drain,
                     cfg, registry, initial)


def build_decode_app(cfg: DeployConfig, registry: str, initial: bool = True) -> serve.Application:
    """initial=False: a live update (autoscaling keeps the current replica count)."""
    live = {"transfer_timeout_seconds": cfg.kv_transfer.timeout_seconds}
    return _pool_app(DecodeDeployment, "decode", cfg.decode, decode_worker_config(cfg, registry), live,
                     DECODE_DRAIN_SECONDS, cfg, registry, initial)


def _pool_app(deployment: Any, name: str, pool: PrefillSection | DecodeSection,
              worker: PrefillWorkerConfig | DecodeWorkerConfig, live: dict[str, float], drain: float,
              cfg: DeployConfig, registry: str, initial: bool) -> serve.Application:
    """One pool's Serve application: a replica per TP group (its ranks packed in a placement group),
    `live` settings changed through user_config, `drain` seconds to finish work when it leaves."""
    options: dict[str, Any] = {"ray_actor_options": _actor_options(pool.resources)}
    if pool.tensor_parallel_size > 1:
        options["placement_group_bundles"] = [_bundle(pool.resources)] * pool.tensor_parallel_size
        options["placement_group_strategy"] = "PACK"
    version = version_of(worker, tuple(live), options)
    return deployment.options(
        **options, **_scaling(name, pool.replicas, pool.autoscaling, registry, cfg, initial),
        user_config=live,
        graceful_shutdown_timeout_s=drain + DRAIN_MARGIN_SECONDS + DRAIN_HEARTBEATS * cfg.router.heartbeat_seconds,
        version=version, _internal=True,
    ).bind(worker)
