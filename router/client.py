"""Client helpers for the CLI (`pdserve generate`, `pdserve status`): blocking gRPC calls."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from pdserve.v1 import router_pb2, router_pb2_grpc

from router.security import auth_metadata, client_channel
from router.status import format_status, status_json

__all__ = ["Chunk", "Completion", "Endpoint", "format_status", "generate", "generate_stream", "get_status",
           "status_json", "wait_healthy"]

FINISH_NAMES = {router_pb2.STOP: "stop", router_pb2.LENGTH: "length", router_pb2.ABORT: "abort"}


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where and how to reach a router: API key, and TLS files (PEM paths) when it uses TLS."""

    address: str
    api_key: str | None = None
    root_ca: str | None = None      # trust this CA (turns TLS on)
    client_cert: str | None = None  # mutual TLS
    client_key: str | None = None

    def channel(self) -> grpc.Channel:
        return client_channel(self.address, self.root_ca, self.client_cert, self.client_key)

    @property
    def metadata(self) -> tuple[tuple[str, str], ...] | None:
        return auth_metadata(self.api_key)


Target = str | Endpoint


def _endpoint(target: Target) -> Endpoint:
    return target if isinstance(target, Endpoint) else Endpoint(target)


@dataclass(frozen=True, slots=True)
class Chunk:
    """One streamed message. finish_reason ('stop' | 'length' | 'abort') and usage
    ((prompt_tokens, completion_tokens)) are set on the last one only."""

    text: str
    token_ids: tuple[int, ...]
    finish_reason: str | None
    usage: tuple[int, int] | None
    logprobs: tuple[float, ...] = ()


@dataclass(frozen=True, slots=True)
class Completion:
    text: str
    token_ids: tuple[int, ...]
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    seconds_to_first_token: float
    seconds_total: float


def build_request(prompt: str | Sequence[int], *, max_tokens: int | None = None,
                  temperature: float | None = None, top_p: float | None = None,
                  top_k: int | None = None, seed: int | None = None, stop: Sequence[str] = (),
                  ignore_eos: bool = False, logprobs: bool = False,
                  request_id: str = "") -> router_pb2.GenerateRequest:
    """Unset (None) sampling fields take the server's defaults (greedy, default_max_tokens)."""
    sp = router_pb2.SamplingParams(stop=list(stop), ignore_eos=ignore_eos, logprobs=int(logprobs))
    for name, value in (("max_tokens", max_tokens), ("temperature", temperature), ("top_p", top_p),
                        ("top_k", top_k), ("seed", seed)):
        if value is not None:
            setattr(sp, name, value)
    req = router_pb2.GenerateRequest(request_id=request_id or uuid.uuid4().hex, sampling=sp)
    if isinstance(prompt, str):
        req.prompt = prompt
    else:
        req.prompt_token_ids.ids.extend(prompt)
    return req


def _chunk(msg: router_pb2.GenerateResponse) -> Chunk:
    last = msg.finish_reason != router_pb2.FINISH_REASON_UNSPECIFIED
    return Chunk(
        text=msg.text, token_ids=tuple(msg.token_ids),
        finish_reason=FINISH_NAMES.get(msg.finish_reason) if last else None,
        usage=(msg.usage.prompt_tokens, msg.usage.completion_tokens) if last else None,
        logprobs=tuple(msg.logprobs),
    )


def generate_stream(address: Target, prompt: str | Sequence[int], *, timeout: float | None = None,
                    **sampling: object) -> Iterator[Chunk]:
    """Streams a completion; raises grpc.RpcError (e.g. INVALID_ARGUMENT, RESOURCE_EXHAUSTED).
    `sampling`: max_tokens, temperature, top_p, top_k, seed, stop, ignore_eos, logprobs, request_id.
    Closing the iterator early cancels the call."""
    request = build_request(prompt, **sampling)  # type: ignore[arg-type]
    endpoint = _endpoint(address)
    with endpoint.channel() as channel:
        stub = router_pb2_grpc.RouterStub(channel)
        call = stub.Generate(request, timeout=timeout, metadata=endpoint.metadata)
        try:
            for msg in call:
                yield _chunk(msg)
        finally:
            call.cancel()


def generate(address: Target, prompt: str | Sequence[int], *, timeout: float | None = None,
             **sampling: object) -> Completion:
    """The whole completion, with time to first token."""
    start = time.perf_counter()
    first: float | None = None
    text: list[str] = []
    ids: list[int] = []
    last: Chunk | None = None
    for chunk in generate_stream(address, prompt, timeout=timeout, **sampling):
        first = time.perf_counter() - start if first is None else first
        text.append(chunk.text)
        ids.extend(chunk.token_ids)
        last = chunk
    if last is None or last.usage is None or last.finish_reason is None:
        raise RuntimeError("the stream ended without a finish reason")
    return Completion("".join(text), tuple(ids), last.finish_reason, last.usage[0], last.usage[1],
                      first or 0.0, time.perf_counter() - start)


def get_status(address: Target, timeout: float = 5.0) -> router_pb2.StatusResponse:
    endpoint = _endpoint(address)
    with endpoint.channel() as channel:
        response: router_pb2.StatusResponse = router_pb2_grpc.RouterStub(channel).GetStatus(
            router_pb2.StatusRequest(), timeout=timeout, metadata=endpoint.metadata)
        return response


def wait_healthy(address: Target, timeout: float, poll_seconds: float = 0.2) -> None:
    """Returns once the router's health is SERVING; raises TimeoutError after `timeout` s."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    with _endpoint(address).channel() as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            try:
                resp = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=poll_seconds * 5)
                if resp.status == health_pb2.HealthCheckResponse.SERVING:
                    return
                last = health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
            except grpc.RpcError as e:
                last = f"{e.code().name}"  # type: ignore[attr-defined]
            time.sleep(poll_seconds)
    raise TimeoutError(f"router at {_endpoint(address).address} not SERVING after {timeout:.0f}s (last: {last})")
