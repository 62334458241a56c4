"""OpenAI request bodies -> the router's GenerateRequest (the same one gRPC clients send).

Only the shape is checked here (types, fields pdserve does not support); the values go through the
router's own validation (router/validate.py), whose field names `param_of` turns back into the
OpenAI names. Every problem is an ApiError naming the field as `param`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from pdserve.v1 import router_pb2

from router.chat_template import ChatTemplate, ChatTemplateError


class ApiError(Exception):
    """An HTTP error with OpenAI's body: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 type_: str = "invalid_request_error", code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type_, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


def bad(param: str, message: str) -> ApiError:
    return ApiError(400, f"{param}: {message}", param)


@dataclass(frozen=True, slots=True)
class OpenAIRequest:
    chat: bool                      # /v1/chat/completions (else /v1/completions)
    generate: router_pb2.GenerateRequest
    stream: bool
    include_usage: bool             # stream_options.include_usage: a final usage chunk
    logprobs: bool                  # return the sampled tokens' logprobs
    max_tokens_key: str = "max_tokens"  # the body key the client used (chat: max_completion_tokens)


# Fields that would change the answer in ways pdserve does not implement: refused, not ignored.
# (name, accepted default values)
_UNSUPPORTED: tuple[tuple[str, tuple[object, ...]], ...] = (
    ("n", (1,)), ("best_of", (1,)), ("echo", (False,)), ("suffix", ("",)),
    ("presence_penalty", (0, 0.0)), ("frequency_penalty", (0, 0.0)), ("repetition_penalty", (1, 1.0)),
    ("logit_bias", ({},)), ("tools", ([],)), ("functions", ([],)),
)


def _check_unsupported(body: Mapping[str, Any]) -> None:
    for name, fine in _UNSUPPORTED:
        value = body.get(name)
        if value is not None and not any(type(value) is type(f) and value == f for f in fine):
            raise bad(name, f"not supported by pdserve (got {value!r})")
    fmt = body.get("response_format")
    if fmt is not None and not (isinstance(fmt, Mapping) and fmt.get("type") == "text"):
        raise bad("response_format", "only {\"type\": \"text\"} is supported")


def _typed(body: Mapping[str, Any], name: str, check: Callable[[object], bool], what: str) -> Any:
    value = body.get(name)
    if value is not None and not check(value):
        raise bad(name, f"expected {what}, got {value!r}")
    return value


def _int(body: Mapping[str, Any], name: str) -> int | None:
    return _typed(body, name, lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer")


def _float(body: Mapping[str, Any], name: str) -> float | None:
    value = _typed(body, name, lambda v: isinstance(v, int | float) and not isinstance(v, bool),
                   "a number")
    return None if value is None else float(value)


def _bool(body: Mapping[str, Any], name: str) -> bool:
    return bool(_typed(body, name, lambda v: isinstance(v, bool), "true or false"))


def _stop(body: Mapping[str, Any]) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    items = [stop] if isinstance(stop, str) else stop
    if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
        raise bad("stop", f"expected a string or a list of strings, got {stop!r}")
    return items


def _uint(value: int | None, name: str, bits: int) -> int | None:
    if value is not None and not 0 <= value < 1 << bits:
        raise bad(name, f"must be between 0 and {(1 << bits) - 1}, got {value}")
    return value


def _sampling(body: Mapping[str, Any], max_tokens: int | None) -> router_pb2.SamplingParams:
    sp = router_pb2.SamplingParams(stop=_stop(body), ignore_eos=_bool(body, "ignore_eos"))
    values = {"max_tokens": _uint(max_tokens, "max_tokens", 32), "temperature": _float(body, "temperature"),
              "top_p": _float(body, "top_p"), "top_k": _int(body, "top_k"),
              "seed": _uint(_int(body, "seed"), "seed", 64)}
    if values["top_k"] is not None and not -(1 << 31) <= values["top_k"] < 1 << 31:
        raise bad("top_k", f"out of range: {values['top_k']}")
    for name, value in values.items():
        if value is not None:
            setattr(sp, name, value)
    _min_tokens(body, sp)
    return sp


def _min_tokens(body: Mapping[str, Any], sp: router_pb2.SamplingParams) -> None:
    """`min_tokens` (vLLM's extension, sent by benchmark clients): 0 or 1 holds anyway; a value of
    at least max_tokens means "never stop early", i.e. ignore EOS. Anything between is refused."""
    n = _int(body, "min_tokens")
    if n is None or n <= 1:
        return
    if not sp.HasField("max_tokens") or n < sp.max_tokens:
        raise bad("min_tokens", "only 0, 1 or a value >= max_tokens (generate exactly max_tokens, "
                  "EOS ignored) is supported")
    sp.ignore_eos = True


def _stream_options(body: Mapping[str, Any], stream: bool) -> bool:
    options = body.get("stream_options")
    if options is None:
        return False
    if not isinstance(options, Mapping):
        raise bad("stream_options", f"expected an object, got {options!r}")
    if not stream:
        raise bad("stream_options", "only allowed when stream is true")
    return bool(_typed(options, "include_usage", lambda v: isinstance(v, bool), "true or false"))


def _prompt(body: Mapping[str, Any], req: router_pb2.GenerateRequest) -> None:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        req.prompt = prompt
    elif isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        if any(not 0 <= t < 1 << 32 for t in prompt):
            raise bad("prompt", "token ids must be between 0 and 2**32 - 1")
        req.prompt_token_ids.ids.extend(prompt)
    elif prompt is None:
        raise bad("prompt", "is required")
    else:
        raise bad("prompt", "expected a string or a list of token ids (one prompt per request)")


def _common(body: Mapping[str, Any], request_id: str, chat: bool) -> tuple[bool, bool]:
    if not isinstance(body, Mapping):
        raise bad("body", "expected a JSON object")
    _check_unsupported(body)
    stream = _bool(body, "stream")
    return stream, _stream_options(body, stream)


def parse_completion(body: Mapping[str, Any], request_id: str) -> OpenAIRequest:
    """POST /v1/completions."""
    stream, usage = _common(body, request_id, chat=False)
    logprobs = _int(body, "logprobs")
    req = router_pb2.GenerateRequest(request_id=request_id)
    _prompt(body, req)
    req.sampling.CopyFrom(_sampling(body, _int(body, "max_tokens")))
    if logprobs is not None:  # OpenAI's k alternatives: only the sampled token's (k = 0 or 1)
        req.sampling.logprobs = max(1, _uint(logprobs, "logprobs", 32) or 0)
    return OpenAIRequest(False, req, stream, usage, logprobs is not None)


def _content(message: Mapping[str, Any], i: int) -> str:
    content = message.get("content")
    if content is None or isinstance(content, str):
        return content or ""
    if not isinstance(content, list):
        raise bad(f"messages[{i}].content", "expected a string or a list of content parts")
    texts = []
    for j, part in enumerate(content):
        if not isinstance(part, Mapping) or part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise bad(f"messages[{i}].content[{j}]", "only text parts ({\"type\": \"text\", "
                      "\"text\": ...}) are supported")
        texts.append(part["text"])
    return "\n".join(texts)


def _messages(body: Mapping[str, Any]) -> list[dict[str, Any]]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad("messages", "expected a non-empty list of messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or not isinstance(m.get("role"), str):
            raise bad(f"messages[{i}]", "expected an object with a string `role`")
        out.append({**m, "content": _content(m, i)})
    return out


def _chat_logprobs(body: Mapping[str, Any]) -> bool:
    wanted = _bool(body, "logprobs")
    top = _int(body, "top_logprobs")
    if top:
        raise bad("top_logprobs", "only the sampled token's logprob is supported (0 or unset)")
    return wanted


def parse_chat(body: Mapping[str, Any], request_id: str, template: ChatTemplate | None,
               bos_added: bool = False) -> OpenAIRequest:
    """POST /v1/chat/completions; `bos_added`: the tokenizer adds the BOS itself (a template's
    leading BOS text is then dropped, as transformers tokenizes without special tokens)."""
    stream, usage = _common(body, request_id, chat=True)
    if template is None:
        raise ApiError(400, "this model has no chat template (tokenizer_config.json has no "
                       "`chat_template`): use /v1/completions", "messages", code="no_chat_template")
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    req = router_pb2.GenerateRequest(request_id=request_id)
    req.sampling.CopyFrom(_sampling(body, _int(body, key)))
    logprobs = _chat_logprobs(body)
    req.sampling.logprobs = int(logprobs)
    try:
        prompt = template.render(_messages(body))
    except ChatTemplateError as e:
        raise bad("messages", str(e)) from None
    bos = template.tokens.get("bos_token")
    req.prompt = prompt[len(bos):] if bos_added and bos and prompt.startswith(bos) else prompt
    return OpenAIRequest(True, req, stream, usage, logprobs, key)


_INDEX = re.compile(r"\[\d+\]$")


def param_of(field: str, request: OpenAIRequest) -> str:
    """The OpenAI name of a router validation field (`sampling.max_tokens` -> `max_tokens`)."""
    name = _INDEX.sub("", field.removeprefix("sampling."))
    if name in ("prompt", "prompt_token_ids"):
        return "messages" if request.chat else "prompt"
    if name == "max_tokens":
        return request.max_tokens_key
    if name == "logprobs" and request.chat:
        return "top_logprobs"
    if name == "request_id":
        return "x-request-id"
    return name
