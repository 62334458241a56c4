"""RouterServer: the public API (Router, health, reflection) and the internal Registry, on grpc.aio,
and the OpenAI-compatible HTTP door (router/http_server.py) on `http_port`, in the same event loop.

Public server (config.host:port): pdserve.v1.Router, grpc.health.v1.Health and server reflection.
With api_keys set, Router calls need `authorization: Bearer <key>` (health and reflection stay open);
with tls_cert/tls_key the public port speaks TLS. Health is NOT_SERVING until at least one ready prefill and one ready decode replica are registered,
and goes back to NOT_SERVING when either pool empties. Internal server
(config.internal_host:internal_port): pdserve.v1.Registry, where workers heartbeat.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from pdserve.v1 import worker_pb2, worker_pb2_grpc

from router.admission import Admission
from router.config import RouterConfig
from router.http_server import HttpServer, server_ssl_context
from router.observe import RequestObserver
from router.picker import AffinityMemory
from router.registry import Registry
from router.request_run import FlowDeps
from router.security import server_credentials
from router.service import ROUTER_SERVICE, RegistryService, RouterService
from router.tokenizer import TextCodec

log = logging.getLogger(__name__)
REGISTRY_SERVICE = worker_pb2.DESCRIPTOR.services_by_name["Registry"].full_name
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
# A taken port is an error, not silently shared (gRPC sets SO_REUSEPORT by default).
SERVER_OPTIONS = (("grpc.so_reuseport", 0),)
RETIRE_GRACE_SECONDS = 60.0  # calls still running on a forgotten replica's channel get this long


class RouterServer:
    """`await start()` binds both servers (ports may be 0: read `port` / `internal_port` after)."""

    def __init__(self, config: RouterConfig, tokenizer: TextCodec | None,
                 observer: RequestObserver | None = None) -> None:
        self.config = config
        self.registry = Registry(config.heartbeat_seconds, config.block_size)
        self._tasks: set[asyncio.Task[None]] = set()
        self.deps = FlowDeps(
            config=config, registry=self.registry,
            admission=Admission(config.max_inflight, config.max_queued_prompt_tokens),
            memory=AffinityMemory(), codec=tokenizer, spawn=self._spawn, observer=observer,
        )
        self.health = health.aio.HealthServicer()
        self.registry_service = RegistryService(self.deps)  # its on_apply: set by `pdserve up`
        self.port = 0
        self.internal_port = 0
        self.http_port = 0
        self.http: HttpServer | None = None
        self._public: grpc.aio.Server | None = None
        self._internal: grpc.aio.Server | None = None
        self._serving: bool | None = None
        self._maintainer: asyncio.Task[None] | None = None

    @property
    def address(self) -> str:
        return f"{self.config.host}:{self.port}"

    @property
    def http_address(self) -> str:
        """host:port of the OpenAI-compatible HTTP door ("" when off)."""
        return f"{self.config.host}:{self.http_port}" if self.http is not None else ""

    @property
    def internal_address(self) -> str:
        return f"{self.config.internal_host}:{self.internal_port}"

    def reconfigure(self, config: RouterConfig) -> None:
        """Live change of the limits (admission, default max_tokens, API keys): requests read
        them per call. Addresses, TLS and heartbeats need a restart and are not changed here."""
        self.config = config
        self.deps.admission.max_inflight = config.max_inflight
        self.deps.admission.max_queued_prompt_tokens = config.max_queued_prompt_tokens
        object.__setattr__(self.deps, "config", config)  # FlowDeps is frozen for the requests' sake

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def start(self) -> None:
        self._public = grpc.aio.server(options=SERVER_OPTIONS)
        self._public.add_generic_rpc_handlers((RouterService(self.deps).handler(),))
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._public)
        reflection.enable_server_reflection(
            (ROUTER_SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), self._public
        )
        self.port = self._bind(self._public, self.config.host, self.config.port, server_credentials(self.config))
        self._internal = grpc.aio.server(options=SERVER_OPTIONS)
        worker_pb2_grpc.add_RegistryServicer_to_server(self.registry_service, self._internal)
        self.internal_port = self._bind(self._internal, self.config.internal_host, self.config.internal_port)
        await self._set_health()
        self.registry.on_change = lambda: self._spawn(self._set_health())
        await self._public.start()
        await self._internal.start()
        if self.config.http_port is not None:
            await self._start_http(self.config.http_port)
        self._maintainer = asyncio.get_running_loop().create_task(self._maintain())
        log.info("router on %s (HTTP %s), registry on %s", self.address, self.http_address or "off",
                 self.internal_address)

    async def _start_http(self, port: int) -> None:
        cfg = self.config
        self.http = HttpServer(self.deps, lambda: bool(self._serving))
        try:
            self.http_port = await self.http.start(
                cfg.host, port, server_ssl_context(cfg.tls_cert, cfg.tls_key, cfg.tls_client_ca))
        except BaseException:
            self.http = None
            await self.stop(0)
            raise

    @staticmethod
    def _bind(server: grpc.aio.Server, host: str, port: int,
              credentials: grpc.ServerCredentials | None = None) -> int:
        address = f"{host}:{port}"
        try:
            if credentials is None:
                bound = server.add_insecure_port(address)
            else:
                bound = server.add_secure_port(address, credentials)
        except RuntimeError as e:
            raise OSError(f"router: cannot bind {address} (in use, or not an address of this host)") from e
        if bound == 0:
            raise OSError(f"router: cannot bind {address}")
        return bound

    async def _set_health(self) -> None:
        serving = self.registry.serving()
        if serving == self._serving:
            return
        self._serving = serving
        status = SERVING if serving else NOT_SERVING
        for service in ("", ROUTER_SERVICE):
            await self.health.set(service, status)

    async def _maintain(self) -> None:
        """Forgets silent replicas, closes their channels (running calls get a grace), updates health."""
        period = self.config.heartbeat_seconds / 2
        while True:
            await asyncio.sleep(period)
            gone = self.registry.expire()
            if gone:
                log.warning("forgot silent replicas: %s", ", ".join(gone))
            for channel in self.registry.take_retired():
                self._spawn(channel.close(RETIRE_GRACE_SECONDS))
            await self._set_health()

    async def stop(self, grace: float | None = None) -> None:
        """Stops accepting calls; running ones get `grace` seconds, then are cancelled."""
        await self.health.enter_graceful_shutdown()
        self._serving = False
        if self.http is not None:
            await self.http.stop()
        for server in (self._public, self._internal):
            if server is not None:
                await server.stop(grace)
        if self._maintainer is not None:
            self._maintainer.cancel()
            await asyncio.gather(self._maintainer, return_exceptions=True)
        if self._tasks:  # ReleaseKV calls and health updates: let them finish, briefly
            await asyncio.wait(list(self._tasks), timeout=self.config.release_timeout_seconds)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.registry.close()
