"""Bring a whole pdserve deployment up and down: Ray, the router, both pools.

    cluster = Cluster(cfg); address = await cluster.start(); ...; await cluster.stop()

Order: the router starts first (the pools need its registry address), then Serve deploys the prefill
and decode applications, then `start()` waits until the router reports SERVING (both pools ready).
"""

from __future__ import annotations

import asyncio
import logging
import time

from deploy.config import DeployConfig, check_against_model
from deploy.serve_app import DECODE_APP, PREFILL_APP, build_decode_app, build_prefill_app
from engine.config import load_config as load_model_config
from engine.tokenizer import Tokenizer
from router.config import RouterConfig
from router.server import RouterServer

log = logging.getLogger(__name__)


def router_config(cfg: DeployConfig, vocab_size: int, eos: tuple[int, ...]) -> RouterConfig:
    r = cfg.router
    return RouterConfig(
        vocab_size=vocab_size, context_len=int(cfg.model.max_model_len or 0),
        block_size=cfg.model.block_size, eos_token_ids=eos, host=r.host, port=r.port,
        internal_host=r.internal_host, max_inflight=r.max_inflight,
        max_queued_prompt_tokens=r.max_queued_prompt_tokens,
        default_max_tokens=r.default_max_tokens, heartbeat_seconds=r.heartbeat_seconds,
        api_keys=tuple(r.api_keys), tls_cert=r.tls.cert, tls_key=r.tls.key, tls_client_ca=r.tls.client_ca,
        migration=r.migration,
    )


class Cluster:
    def __init__(self, cfg: DeployConfig) -> None:
        model = load_model_config(cfg.model.path)
        self.cfg = check_against_model(cfg, model.num_kv_heads, model.max_position_embeddings)
        self.tokenizer = Tokenizer.from_model_dir(cfg.model.path)
        self.router = RouterServer(router_config(self.cfg, model.vocab_size, model.eos_token_ids), self.tokenizer)
        self._started_ray = False

    @property
    def address(self) -> str:
        return self.router.address

    async def start(self, timeout: float = 300.0) -> str:
        await self.router.start()
        await asyncio.to_thread(self._deploy)
        await self.wait_serving(timeout)
        return self.router.address

    def _deploy(self) -> None:
        import ray
        from ray import serve

        if not ray.is_initialized():
            ray.init(address=self.cfg.ray.address, namespace=self.cfg.ray.namespace, log_to_driver=False)
            self._started_ray = self.cfg.ray.address is None
        serve.start(proxy_location="Disabled")
        registry = self.router.internal_address
        serve.run(build_prefill_app(self.cfg, registry), name=PREFILL_APP, route_prefix=None)
        serve.run(build_decode_app(self.cfg, registry), name=DECODE_APP, route_prefix=None)

    async def wait_serving(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.router.registry.serving():
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"pools not ready after {timeout:.0f}s")
            await asyncio.sleep(0.2)

    async def stop(self) -> None:
        await asyncio.to_thread(self._undeploy)
        await self.router.stop(grace=1.0)

    def _undeploy(self) -> None:
        import ray
        from ray import serve

        if not ray.is_initialized():
            return
        for app in (DECODE_APP, PREFILL_APP):
            try:
                serve.delete(app)
            except Exception as exc:  # noqa: BLE001 - keep tearing down
                log.warning("deleting %s: %s", app, exc)
        if self._started_ray:
            serve.shutdown()
            ray.shutdown()
