"""gRPC handlers: the public Router service and the internal Registry service."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import grpc
from pdserve.v1 import router_pb2, worker_pb2, worker_pb2_grpc

from router.errors import RouterError
from router.flow import run_request
from router.registry import RejectedHeartbeat
from router.request_run import FlowDeps
from router.security import authorized
from router.status import build_status
from router.validate import InvalidRequest, prepare
from router.wire import BadRequest, RequestParser

ROUTER_SERVICE = router_pb2.DESCRIPTOR.services_by_name["Router"].full_name


class RouterService:
    """Router.Generate and Router.GetStatus over the shared FlowDeps."""

    def __init__(self, deps: FlowDeps) -> None:
        self.deps = deps
        self.parser = RequestParser()

    async def _authorize(self, context: grpc.aio.ServicerContext) -> None:
        if not authorized(context.invocation_metadata(), self.deps.config.api_keys):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                                "missing or unknown API key (send `authorization: Bearer <key>`)")

    async def generate(self, request: router_pb2.GenerateRequest | BadRequest,
                       context: grpc.aio.ServicerContext) -> None:
        await self._authorize(context)
        if isinstance(request, BadRequest):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
            return
        try:
            prep = prepare(request, self.deps.config, self.deps.codec)
        except InvalidRequest as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
            return
        try:
            await run_request(prep, self.deps, context.write, context.time_remaining)
        except RouterError as e:
            await context.abort(e.code, e.message)

    async def get_status(self, request: router_pb2.StatusRequest,
                         context: grpc.aio.ServicerContext) -> router_pb2.StatusResponse:
        await self._authorize(context)
        config = self.deps.config
        return build_status(self.deps.registry, self.deps.admission, config.vocab_size, config.context_len)

    def handler(self) -> grpc.GenericRpcHandler:
        """Generate parses its request with RequestParser (bad UTF-8 -> INVALID_ARGUMENT)."""
        return grpc.method_handlers_generic_handler(ROUTER_SERVICE, {
            "Generate": grpc.unary_stream_rpc_method_handler(
                self.generate,
                request_deserializer=self.parser.parse,
                response_serializer=router_pb2.GenerateResponse.SerializeToString,
            ),
            "GetStatus": grpc.unary_unary_rpc_method_handler(
                self.get_status,
                request_deserializer=router_pb2.StatusRequest.FromString,
                response_serializer=router_pb2.StatusResponse.SerializeToString,
            ),
        })


ApplyHandler = Callable[[worker_pb2.ApplyRequest], Awaitable[worker_pb2.ApplyResult]]


class RegistryService(worker_pb2_grpc.RegistryServicer):
    """Registry.Heartbeat: workers announce themselves and their load. Registry.ReportScaling:
    autoscaling policies report decisions, which GetStatus shows. Registry.Apply: `pdserve apply`
    hands a new file to `on_apply`, which the `pdserve up` running this router sets."""

    def __init__(self, deps: FlowDeps) -> None:
        self.registry = deps.registry
        self.on_apply: ApplyHandler | None = None

    async def Heartbeat(self, request: worker_pb2.WorkerStatus,  # noqa: N802 - gRPC method name
                        context: grpc.aio.ServicerContext) -> worker_pb2.HeartbeatAck:
        try:
            known = self.registry.heartbeat(request)
        except RejectedHeartbeat as e:
            await context.abort(e.code, str(e))
            raise  # unreachable: abort raises
        return worker_pb2.HeartbeatAck(known=known)

    async def ReportScaling(self, request: router_pb2.ScalingDecision,  # noqa: N802 - gRPC method name
                            context: grpc.aio.ServicerContext) -> worker_pb2.HeartbeatAck:
        try:
            self.registry.report_scaling(request)
        except RejectedHeartbeat as e:
            await context.abort(e.code, str(e))
            raise
        return worker_pb2.HeartbeatAck(known=True)

    async def Apply(self, request: worker_pb2.ApplyRequest,  # noqa: N802 - gRPC method name
                    context: grpc.aio.ServicerContext) -> worker_pb2.ApplyResult:
        if self.on_apply is None:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED,
                                "this router was not started by `pdserve up`: nothing to apply a file to")
            raise AssertionError  # unreachable: abort raises
        return await self.on_apply(request)
