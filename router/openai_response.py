"""OpenAI response bodies and Server-Sent Events, built from the router's GenerateResponse messages.

    out = OpenAIOutput(request, request_id, model, created, token_text)
    out.chunk(msg)  -> one SSE chunk (dict) per router message
    out.role_chunk(), out.usage_chunk()    (chat's first chunk; the include_usage chunk)
    out.add(msg); out.body()               (non-streaming: accumulate, then the whole answer)
    sse(obj) -> b"data: {json}\\n\\n";  DONE = b"data: [DONE]\\n\\n"

Chunks carry exactly what OpenAI sends: `object` "text_completion" / "chat.completion.chunk", the
finish reason on the message that ends the request, `usage: null` on every chunk when the client
asked for a usage chunk, which then comes last with `choices: []`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

import grpc
from pdserve.v1 import router_pb2

from router.openai_request import ApiError, OpenAIRequest

DONE = b"data: [DONE]\n\n"
FINISH = {router_pb2.STOP: "stop", router_pb2.LENGTH: "length", router_pb2.ABORT: "abort"}
# gRPC status of the router's flow -> (HTTP status, OpenAI error type)
HTTP_OF = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error"),
    grpc.StatusCode.OUT_OF_RANGE: (400, "invalid_request_error"),
    grpc.StatusCode.FAILED_PRECONDITION: (400, "invalid_request_error"),
    grpc.StatusCode.UNAUTHENTICATED: (401, "authentication_error"),
    grpc.StatusCode.PERMISSION_DENIED: (403, "permission_error"),
    grpc.StatusCode.ALREADY_EXISTS: (409, "conflict_error"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error"),
    grpc.StatusCode.CANCELLED: (499, "cancelled"),
    grpc.StatusCode.UNAVAILABLE: (503, "service_unavailable"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "timeout"),
}


def api_error(code: grpc.StatusCode, message: str, param: str | None = None) -> ApiError:
    """The HTTP error for a gRPC status of the request flow (anything unlisted: 500)."""
    status, kind = HTTP_OF.get(code, (500, "server_error"))
    return ApiError(status, message, param, kind, code.name.lower())


def sse(obj: object) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


def usage_of(msg: router_pb2.GenerateResponse) -> dict[str, int]:
    p, c = msg.usage.prompt_tokens, msg.usage.completion_tokens
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


class OpenAIOutput:
    """The answer to one request; `token_text(id)` spells a token (for logprobs)."""

    def __init__(self, request: OpenAIRequest, request_id: str, model: str, created: int,
                 token_text: Callable[[int], str]) -> None:
        self.request, self.request_id, self.model, self.created = request, request_id, model, created
        self.id = ("chatcmpl-" if request.chat else "cmpl-") + request_id
        self.token_text = token_text
        self.text: list[str] = []
        self.tokens: list[int] = []
        self.logprobs: list[float] = []
        self.last: router_pb2.GenerateResponse | None = None

    def _head(self, chunk: bool) -> dict[str, Any]:
        kind = ("chat.completion.chunk" if chunk else "chat.completion") if self.request.chat \
            else "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def _logprobs(self, tokens: Sequence[int], logprobs: Sequence[float], offset: int) -> Any:
        if not self.request.logprobs:
            return None
        texts = [self.token_text(t) for t in tokens]
        if self.request.chat:
            return {"content": [{"token": s, "logprob": lp, "bytes": list(s.encode()), "top_logprobs": []}
                                for s, lp in zip(texts, logprobs, strict=False)]}
        offsets, at = [], offset
        for s in texts:
            offsets.append(at)
            at += len(s)
        return {"tokens": texts, "token_logprobs": list(logprobs), "top_logprobs": None,
                "text_offset": offsets}

    def _choice(self, text: str, lp: Any, finish: str | None, chunk: bool) -> dict[str, Any]:
        if not self.request.chat:
            return {"index": 0, "text": text, "logprobs": lp, "finish_reason": finish}
        key, value = ("delta", {"content": text}) if chunk else \
            ("message", {"role": "assistant", "content": text})
        return {"index": 0, key: value, "logprobs": lp, "finish_reason": finish}

    def _chunk(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        out = {**self._head(True), "choices": choices}
        if self.request.include_usage:
            out["usage"] = None
        return out

    def role_chunk(self) -> dict[str, Any]:
        """Chat's first chunk: the assistant role, no text yet."""
        choice = {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                  "finish_reason": None}
        return self._chunk([choice])

    def chunk(self, msg: router_pb2.GenerateResponse) -> dict[str, Any]:
        offset = sum(len(t) for t in self.text)
        self.add(msg)
        lp = self._logprobs(msg.token_ids, msg.logprobs, offset)
        return self._chunk([self._choice(msg.text, lp, FINISH.get(msg.finish_reason), True)])

    def usage_chunk(self) -> dict[str, Any]:
        return {**self._head(True), "choices": [], "usage": self.usage()}

    def add(self, msg: router_pb2.GenerateResponse) -> None:
        self.text.append(msg.text)
        self.tokens.extend(msg.token_ids)
        self.logprobs.extend(msg.logprobs)
        self.last = msg

    def usage(self) -> dict[str, int] | None:
        return usage_of(self.last) if self.last is not None else None

    def body(self) -> dict[str, Any]:
        """The non-streaming answer (after the last message)."""
        last = self.last
        finish = FINISH.get(last.finish_reason) if last is not None else None
        lp = self._logprobs(self.tokens, self.logprobs, 0)
        choice = self._choice("".join(self.text), lp, finish, False)
        return {**self._head(False), "choices": [choice], "usage": self.usage()}
