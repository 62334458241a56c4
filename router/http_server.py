"""HttpServer: the OpenAI-compatible HTTP door into the router (aiohttp, on the router's event loop).

    POST /v1/completions, POST /v1/chat/completions, GET /v1/models, GET /health

A request takes the path of a gRPC Generate call: the same API keys (`authorization: Bearer`), the
same validation (router/validate.py), admission and request flow (router/flow.py `run_request`),
with the router's one tokenizer. Only the shape changes: router/openai_request.py maps the JSON body
to a GenerateRequest, router/openai_response.py maps the messages back (JSON, or SSE when
`stream`). A streamed answer sends its headers with the first message, so an error before it
(400/401/429/503/504) is a plain HTTP status; later errors arrive as an SSE `error` event. A client
that disconnects cancels the handler (aiohttp `handler_cancellation`), which cancels the request
flow exactly like a cancelled gRPC call: every KV block is freed. `x-request-id` becomes the
request id and is echoed; `x-request-timeout` (seconds) is the request's deadline (504 after it).
"""

from __future__ import annotations

import json
import logging
import ssl
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from pdserve.v1 import router_pb2

from router.chat_template import ChatTemplate, ChatTemplateError
from router.errors import RouterError
from router.flow import run_request
from router.openai_request import ApiError, OpenAIRequest, param_of, parse_chat, parse_completion
from router.openai_response import DONE, OpenAIOutput, api_error, sse
from router.request_run import FlowDeps
from router.security import authorized
from router.validate import InvalidRequest, prepare

log = logging.getLogger(__name__)
REQUEST_ID = "x-request-id"
TIMEOUT_HEADER = "x-request-timeout"
MAX_BODY_BYTES = 4 << 20  # as gRPC's default receive limit; larger bodies get 413
STOP_GRACE_SECONDS = 1.0  # at stop, running HTTP requests get this long, then are cancelled
SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def server_ssl_context(cert: str | None, key: str | None, client_ca: str | None) -> ssl.SSLContext | None:
    """The gRPC port's TLS settings as an SSLContext (None = plaintext)."""
    if cert is None or key is None:
        return None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    if client_ca is not None:
        ctx.load_verify_locations(client_ca)
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def _remaining(headers: Any) -> Callable[[], float | None]:
    text = headers.get(TIMEOUT_HEADER)
    if text is None:
        return lambda: None
    try:
        seconds = float(text)
    except ValueError:
        raise ApiError(400, f"{TIMEOUT_HEADER}: expected seconds, got {text!r}", TIMEOUT_HEADER) from None
    deadline = time.monotonic() + seconds
    return lambda: deadline - time.monotonic()


class _Stream:
    """The SSE answer: headers go out with the first message (errors before it keep their status)."""

    def __init__(self, http: web.Request, out: OpenAIOutput) -> None:
        self.http, self.out = http, out
        self.response: web.StreamResponse | None = None

    async def write(self, msg: router_pb2.GenerateResponse) -> None:
        if self.response is None:
            self.response = web.StreamResponse(headers={**SSE_HEADERS, REQUEST_ID: self.out.request_id})
            await self.response.prepare(self.http)
            if self.out.request.chat:
                await self.response.write(sse(self.out.role_chunk()))
        await self.response.write(self.out.chunk_sse(msg))

    async def finish(self) -> web.StreamResponse:
        assert self.response is not None  # run_request writes at least one message
        if self.out.request.include_usage:
            await self.response.write(sse(self.out.usage_chunk()))
        await self.response.write(DONE)
        await self.response.write_eof()
        return self.response

    async def fail(self, err: ApiError) -> web.StreamResponse:
        assert self.response is not None
        await self.response.write(sse(err.body()))
        await self.response.write(DONE)
        await self.response.write_eof()
        return self.response


class HttpServer:
    """Routes and lifecycle; `serving()` is the router's health (both pools ready)."""

    def __init__(self, deps: FlowDeps, serving: Callable[[], bool]) -> None:
        self.deps = deps
        self.serving = serving
        self.port = 0
        self.chat, self.chat_problem = self._compile_chat()
        self._bos_added = bool(deps.codec.encode("")) if deps.codec is not None else False
        self._runner: web.AppRunner | None = None

    def _compile_chat(self) -> tuple[ChatTemplate | None, str]:
        cfg = self.deps.config
        if cfg.chat_template is None:
            return None, ""
        try:
            return ChatTemplate(cfg.chat_template, cfg.chat_tokens), ""
        except ChatTemplateError as e:
            log.warning("chat completions are off: %s", e)
            return None, str(e)

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._errors], client_max_size=MAX_BODY_BYTES)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/health", self.health)
        return app

    async def start(self, host: str, port: int, ssl_context: ssl.SSLContext | None = None) -> int:
        """Binds host:port (0 = a free port); returns the port."""
        self._runner = web.AppRunner(self.app(), handler_cancellation=True, access_log=None,
                                     shutdown_timeout=STOP_GRACE_SECONDS)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port, ssl_context=ssl_context, reuse_port=False)
        try:
            await site.start()
        except OSError as e:
            await self._runner.cleanup()
            raise OSError(f"router: cannot bind HTTP {host}:{port} ({e.strerror or e})") from e
        self.port = int(self._runner.addresses[0][1])
        return self.port

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    @web.middleware
    async def _errors(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Every error as OpenAI's JSON body; the request id echoed when the client sent one."""
        headers = {REQUEST_ID: request.headers[REQUEST_ID]} if REQUEST_ID in request.headers else {}
        try:
            return await handler(request)
        except ApiError as e:
            return web.json_response(e.body(), status=e.status, headers=headers)
        except web.HTTPException as e:  # aiohttp's own 404 / 405 / 413
            err = ApiError(e.status, e.reason, type_="invalid_request_error")
            return web.json_response(err.body(), status=e.status, headers=headers)

    def _authorize(self, request: web.Request) -> None:
        if not authorized(list(request.headers.items()), self.deps.config.api_keys):
            raise ApiError(401, "missing or unknown API key (send `Authorization: Bearer <key>`)",
                           type_="authentication_error", code="invalid_api_key")

    async def _body(self, request: web.Request) -> Any:
        try:
            return json.loads(await request.read())
        except (ValueError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the body is not valid JSON: {e}", "body") from None

    def _check_model(self, body: Any) -> None:
        model = body.get("model") if isinstance(body, dict) else None
        if model is not None and model != self.deps.config.model_name:
            raise ApiError(404, f"the model `{model}` does not exist; this server serves "
                           f"`{self.deps.config.model_name}`", "model", code="model_not_found")

    async def completions(self, request: web.Request) -> web.StreamResponse:
        self._authorize(request)
        body = await self._body(request)
        self._check_model(body)
        return await self._serve(request, parse_completion(body, request.headers.get(REQUEST_ID, "")))

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        self._authorize(request)
        body = await self._body(request)
        self._check_model(body)
        if self.chat_problem:
            raise ApiError(400, self.chat_problem, "messages")
        parsed = parse_chat(body, request.headers.get(REQUEST_ID, ""), self.chat, self._bos_added)
        return await self._serve(request, parsed)

    def _token_text(self, token: int) -> str:
        return self.deps.codec.decode([token]) if self.deps.codec is not None else ""

    async def _serve(self, http: web.Request, req: OpenAIRequest) -> web.StreamResponse:
        """Validation, admission and the request flow of Router.Generate; then the answer."""
        remaining = _remaining(http.headers)
        try:
            prep = prepare(req.generate, self.deps.config, self.deps.codec)
        except InvalidRequest as e:
            raise ApiError(400, str(e), param_of(e.field, req)) from None
        out = OpenAIOutput(req, prep.request_id, self.deps.config.model_name, int(time.time()),
                           self._token_text)
        stream = _Stream(http, out) if req.stream else None

        async def collect(msg: router_pb2.GenerateResponse) -> None:
            out.add(msg)

        try:
            await run_request(prep, self.deps, stream.write if stream else collect, remaining)
        except RouterError as e:
            err = api_error(e.code, e.message)
            if stream is None or stream.response is None:
                raise err from None
            return await stream.fail(err)
        if stream is not None:
            return await stream.finish()
        return web.json_response(out.body(), headers={REQUEST_ID: prep.request_id})

    async def models(self, request: web.Request) -> web.StreamResponse:
        self._authorize(request)
        model = {"id": self.deps.config.model_name, "object": "model", "created": 0,
                 "owned_by": "pdserve", "max_model_len": self.deps.config.context_len}
        return web.json_response({"object": "list", "data": [model]})

    async def health(self, request: web.Request) -> web.StreamResponse:
        """200 when both pools have a ready replica (the gRPC health service's SERVING), else 503."""
        if self.serving():
            return web.json_response({"status": "serving"})
        return web.json_response({"status": "not serving"}, status=503)
