"""A running pdserve deployment: the router (in this process) and the two pools on Ray Serve.

    cluster = Cluster(cfg); address = await cluster.start(); ...; await cluster.stop()

Order: the router starts first (the pools need its registry address), then the Prometheus endpoint
(when `router.metrics_port` is set), then Serve deploys the prefill and decode applications, then
`start()` waits until the router reports SERVING (both pools ready). Then the Cluster publishes the
router's internal address for `pdserve apply` (deploy/apply.py), whose Registry.Apply calls
`await cluster.apply(new_cfg)`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import threading
import time
from typing import Any

from pdserve.v1 import worker_pb2

from deploy.apply import ApplyPlan, plan_apply, publish_registry, withdraw_registry
from deploy.colocated_app import decode_pool_app
from deploy.config import (
    ConfigError,
    DeployConfig,
    Issue,
    check_against_model,
    check_model_dir,
    diff_configs,
    parse_config,
)
from deploy.metrics import Metrics
from deploy.serve_app import DECODE_APP, PREFILL_APP, build_prefill_app
from engine.config import ModelConfig
from engine.config import load_config as load_model_config
from engine.tokenizer import Tokenizer
from router.chat_template import read_chat_template
from router.config import RouterConfig
from router.server import RouterServer

log = logging.getLogger(__name__)
# A local Ray start that failed for the machine's timing, not for the configuration: worth one retry.
_RAY_START_FLAKES = re.compile(r"timed out during startup|Timed out waiting for file")
UNDEPLOY_TIMEOUT_S = 180.0  # decode's drain bound (120 s) and the stops after it


def router_config(cfg: DeployConfig, vocab_size: int, eos: tuple[int, ...]) -> RouterConfig:
    r = cfg.router
    chat = read_chat_template(cfg.model.path)
    return RouterConfig(
        vocab_size=vocab_size, context_len=int(cfg.model.max_model_len or 0),
        block_size=cfg.model.block_size, eos_token_ids=eos, host=r.host, port=r.port,
        internal_host=r.internal_host, max_inflight=r.max_inflight,
        max_queued_prompt_tokens=r.max_queued_prompt_tokens,
        default_max_tokens=r.default_max_tokens, heartbeat_seconds=r.heartbeat_seconds,
        api_keys=r.api_keys, tls_cert=r.tls.cert, tls_key=r.tls.key, tls_client_ca=r.tls.client_ca,
        migration=r.migration, kv_streaming=cfg.kv_transfer.streaming, local_prefill_max_tokens=(
            cfg.decode.local_prefill_max_tokens if cfg.serving_mode == "disaggregated" else 0),
        http_port=r.http.port, model_name=cfg.model.served_name,
        chat_template=chat.source if chat else None, chat_tokens=chat.tokens if chat else (),
    )


class Cluster:
    def __init__(self, cfg: DeployConfig, source: str = "config") -> None:
        check_model_dir(cfg, source)
        self.model: ModelConfig = load_model_config(cfg.model.path)
        self.cfg = self._checked(cfg)
        self.tokenizer = Tokenizer.from_model_dir(cfg.model.path)
        self.metrics = Metrics() if cfg.router.metrics_port is not None else None
        self.router = RouterServer(self._router_config(self.cfg), self.tokenizer,
                                   self.metrics.observer if self.metrics else None)
        self._started_ray = False
        self._published = False
        self._apply_lock = asyncio.Lock()

    def _checked(self, cfg: DeployConfig) -> DeployConfig:
        return check_against_model(cfg, self.model.num_kv_heads, self.model.max_position_embeddings,
                                   num_heads=self.model.num_heads)

    def _router_config(self, cfg: DeployConfig) -> RouterConfig:
        return router_config(cfg, self.model.vocab_size, self.model.eos_token_ids)

    @property
    def address(self) -> str:
        return self.router.address

    @property
    def metrics_address(self) -> str:
        return f"{self.cfg.router.host}:{self.metrics.port}" if self.metrics else ""

    async def start(self, timeout: float = 300.0) -> str:
        await self.router.start()
        if self.metrics is not None:
            self.metrics.attach(self.router.registry, self.router.deps.admission, asyncio.get_running_loop())
            await self.metrics.start(self.cfg.router.host, int(self.cfg.router.metrics_port or 0))
        await asyncio.to_thread(self._deploy)
        await self.wait_serving(timeout)
        self.router.registry_service.on_apply = self._answer
        await asyncio.to_thread(publish_registry, self.cfg.ray.namespace, self.router.internal_address)
        self._published = True
        return self.router.address

    def _deploy(self) -> None:
        import ray
        from ray import serve

        if not ray.is_initialized():
            self._init_ray()
            self._started_ray = self.cfg.ray.address is None
        serve.start(proxy_location="Disabled")
        self._run_apps(self.cfg, ("prefill", "decode"), initial=True)

    def _init_ray(self) -> None:
        """ray.init; a local Ray whose node did not register in time (seen right after another local
        Ray shut down on a busy machine), or whose GCS did not write its port file in time (seen on
        an idle one), is shut down and started once more."""
        import ray

        for attempt in (1, 2):
            try:
                # ERROR: the driver's start-up notes are not the user's business (a retry's "Failed to
                # get node info", "SIGTERM handler is not set" as ray.init runs off the main thread)
                ray.init(address=self.cfg.ray.address or "local", namespace=self.cfg.ray.namespace,
                         log_to_driver=False, logging_level=logging.ERROR)
                return
            except Exception as exc:
                if attempt == 2 or self.cfg.ray.address is not None or not _RAY_START_FLAKES.search(str(exc)):
                    raise
                log.debug("local Ray start-up timed out: %s", exc)
                log.warning("local Ray did not start in time (a busy machine?); starting it again")
                ray.shutdown()

    def _run_apps(self, cfg: DeployConfig, pools: tuple[str, ...], initial: bool) -> None:
        """serve.run each pool's application (blocks until its replicas are up)."""
        from ray import serve

        registry = self.router.internal_address
        if "prefill" in pools and cfg.serving_mode == "disaggregated":  # colocated: no prefill pool
            serve.run(build_prefill_app(cfg, registry, initial), name=PREFILL_APP, route_prefix=None)
        if "decode" in pools:
            serve.run(decode_pool_app(cfg, registry, initial), name=DECODE_APP, route_prefix=None)

    async def wait_serving(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.router.registry.serving():
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"pools not ready after {timeout:.0f}s")
            await asyncio.sleep(0.2)

    async def apply(self, new: DeployConfig, source: str = "apply") -> ApplyPlan:
        """Changes the running deployment to `new` (see deploy/apply.py for what changes live).
        Raises ConfigError, changing nothing, when `new` needs a restart of `pdserve up`."""
        async with self._apply_lock:
            new = self._checked(new)
            plan = plan_apply(diff_configs(self.cfg, new))
            if plan.refused:
                raise ConfigError(source, [Issue(k, "cannot change on a running deployment; restart "
                                                 "`pdserve up` with the new file") for k in plan.refused])
            if plan.router:
                self.router.reconfigure(self._router_config(new))
            if plan.pools:
                await asyncio.to_thread(self._run_apps, new, plan.pools, False)
            self.cfg = new
            log.info("applied %s: %s", source, ", ".join(plan.changed) or "no change")
            return plan

    async def _answer(self, request: worker_pb2.ApplyRequest) -> worker_pb2.ApplyResult:
        """Registry.Apply: `pdserve apply`'s file, applied or refused."""
        source = request.source or "apply"
        try:
            new = parse_config(json.loads(request.config_json), source)
            plan = await self.apply(new, source)
        except ConfigError as exc:
            return worker_pb2.ApplyResult(ok=False, message=str(exc))
        except Exception as exc:  # noqa: BLE001 - report, keep serving
            log.exception("apply %s failed", source)
            return worker_pb2.ApplyResult(ok=False, message=f"{source}: apply failed: {exc}")
        return worker_pb2.ApplyResult(ok=True, message=_describe(source, plan))

    async def stop(self) -> None:
        self.router.registry_service.on_apply = None
        await self.router.stop(grace=1.0)  # clients first: in-flight requests get the grace period
        await asyncio.to_thread(self._undeploy)
        if self.metrics is not None:
            self.metrics.stop()

    def _undeploy(self) -> None:
        import ray
        from ray import serve

        if not ray.is_initialized():
            return
        apps = (DECODE_APP, PREFILL_APP)
        try:
            if self._published:
                withdraw_registry(self.cfg.ray.namespace, self.router.internal_address)
            for app in apps:  # both pools drain at once: the router has stopped, no call can come
                serve.delete(app, _blocking=False)
            deadline = time.monotonic() + UNDEPLOY_TIMEOUT_S
            while set(apps) & set(serve.status().applications) and time.monotonic() < deadline:
                time.sleep(0.1)
        except Exception as exc:  # noqa: BLE001 - keep tearing down
            log.warning("deleting %s: %s", " and ".join(apps), exc)
        if self._started_ray:
            # Our own Ray: its Serve controller goes with it. (serve.shutdown() would make Ray log
            # "Task ServeController.graceful_shutdown failed ... killed by ray.kill", as designed.)
            ray.shutdown()


def _describe(source: str, plan: ApplyPlan) -> str:
    if not plan.changed:
        return f"{source}: no change"
    parts = [f"{source}: changed {', '.join(plan.changed)}"]
    if plan.router:
        parts.append("router limits updated in place")
    if plan.pools:
        parts.append(f"re-deployed {' and '.join(plan.pools)} (replicas kept unless their "
                     "resources or layout changed)")
    return "; ".join(parts)


class LoopThread:
    """An asyncio loop on its own thread, for synchronous code (tests, benchmarks) that owns a Cluster:
    `loop.run(coro)` runs a coroutine there and waits for its result."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Any, timeout: float | None = None) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
