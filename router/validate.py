"""Validation of a GenerateRequest: a Prepared request, or InvalidRequest naming the field.

Cheap checks on the sampling fields come first, then the prompt is tokenized (once) and checked
against the vocabulary and the context window. Nothing is allocated for a request that fails.
"""

from __future__ import annotations

import math
import uuid
from dataclasses import dataclass

from pdserve.v1 import router_pb2, worker_pb2

from router.config import RouterConfig
from router.tokenizer import TextCodec

MAX_REQUEST_ID_CHARS = 256
MAX_STOP_STRINGS = 64


class InvalidRequest(ValueError):
    """Answered as INVALID_ARGUMENT; `field` is the request field at fault."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


@dataclass(frozen=True, slots=True)
class Prepared:
    request_id: str
    prompt_ids: tuple[int, ...]
    sampling: worker_pb2.WorkerSampling  # defaulted; what the workers receive
    stop: tuple[str, ...]
    logprobs: bool


def _check_sampling(sp: router_pb2.SamplingParams) -> None:
    if sp.HasField("max_tokens") and sp.max_tokens == 0:
        raise InvalidRequest("sampling.max_tokens", "must be >= 1 (leave unset for the default)")
    if sp.HasField("temperature") and not (math.isfinite(sp.temperature) and sp.temperature >= 0):
        raise InvalidRequest("sampling.temperature", f"must be a finite number >= 0, got {sp.temperature}")
    if sp.HasField("top_p") and not (0.0 < sp.top_p <= 1.0):  # NaN fails too
        raise InvalidRequest("sampling.top_p", f"must be in (0, 1], got {sp.top_p}")
    if sp.HasField("top_k") and sp.top_k < -1:
        raise InvalidRequest("sampling.top_k", f"must be -1 (off), 0 (off) or >= 1, got {sp.top_k}")
    if sp.logprobs > 1:
        raise InvalidRequest(
            "sampling.logprobs", f"only 0 or 1 is supported (the sampled token's), got {sp.logprobs}"
        )
    if len(sp.stop) > MAX_STOP_STRINGS:
        raise InvalidRequest("sampling.stop", f"at most {MAX_STOP_STRINGS} stop strings, got {len(sp.stop)}")
    for i, s in enumerate(sp.stop):
        if not s:
            raise InvalidRequest(f"sampling.stop[{i}]", "must not be empty")


def _prompt_ids(req: router_pb2.GenerateRequest, cfg: RouterConfig, tok: TextCodec | None) -> tuple[str, list[int]]:
    """(field name, token ids) of the prompt, tokenized here when it is text."""
    which = req.WhichOneof("input")
    if which is None:
        raise InvalidRequest("prompt", "one of prompt or prompt_token_ids is required")
    if which == "prompt_token_ids":
        ids = list(req.prompt_token_ids.ids)
        if not ids:
            raise InvalidRequest("prompt_token_ids", "must not be empty")
        for i, t in enumerate(ids):
            if t >= cfg.vocab_size:
                raise InvalidRequest(
                    f"prompt_token_ids[{i}]", f"token id {t} is outside the vocabulary (0..{cfg.vocab_size - 1})"
                )
        return "prompt_token_ids", ids
    if not req.prompt:
        raise InvalidRequest("prompt", "must not be empty")
    if tok is None:
        raise InvalidRequest("prompt", "this router has no tokenizer; send prompt_token_ids")
    ids = tok.encode(req.prompt)
    if not ids:
        raise InvalidRequest("prompt", "encodes to no tokens")
    return "prompt", ids


def _max_tokens(sp: router_pb2.SamplingParams, field: str, n_prompt: int, cfg: RouterConfig) -> int:
    room = cfg.context_len - n_prompt
    if room < 1:
        raise InvalidRequest(
            field,
            f"{n_prompt} tokens do not fit the context window of {cfg.context_len} "
            "(at least one token must be generated)",
        )
    if not sp.HasField("max_tokens"):
        return min(cfg.default_max_tokens, room)
    if sp.max_tokens > room:
        raise InvalidRequest(
            "sampling.max_tokens",
            f"prompt ({n_prompt} tokens) + max_tokens ({sp.max_tokens}) exceeds the context window "
            f"({cfg.context_len})",
        )
    return sp.max_tokens


def _request_id(req: router_pb2.GenerateRequest) -> str:
    if len(req.request_id) > MAX_REQUEST_ID_CHARS:
        raise InvalidRequest("request_id", f"at most {MAX_REQUEST_ID_CHARS} characters")
    return req.request_id or uuid.uuid4().hex


def prepare(req: router_pb2.GenerateRequest, cfg: RouterConfig, tok: TextCodec | None) -> Prepared:
    """Validates, defaults and tokenizes. Raises InvalidRequest."""
    request_id = _request_id(req)
    sp = req.sampling
    _check_sampling(sp)
    if sp.stop and tok is None:
        raise InvalidRequest("sampling.stop", "this router has no tokenizer to match stop strings")
    field, ids = _prompt_ids(req, cfg, tok)
    sampling = worker_pb2.WorkerSampling(
        max_tokens=_max_tokens(sp, field, len(ids), cfg),
        temperature=sp.temperature if sp.HasField("temperature") else 0.0,
        top_p=sp.top_p if sp.HasField("top_p") else 1.0,
        top_k=sp.top_k if sp.HasField("top_k") and sp.top_k != 0 else -1,
        stop=list(sp.stop),
        ignore_eos=sp.ignore_eos,
        logprobs=sp.logprobs > 0,
    )
    if sp.HasField("seed"):
        sampling.seed = sp.seed
    return Prepared(request_id, tuple(ids), sampling, tuple(sp.stop), sp.logprobs > 0)
