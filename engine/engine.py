"""LLMEngine: the step loop both workers drive (schedule -> run the model -> post-process).

Request lifecycles:
  * plain: ``add_request`` -> WAITING -> RUNNING (chunked prefill, then decode) -> finished
    (eos, stop token/string, max_tokens or the context window); blocks are freed at once.
  * prefill role (``hold_kv=True``): finishes after its first sampled token but KEEPS its blocks
    (``kv_block_ids``) until ``release_kv``. Its finish_reason is PREFILLED unless that first
    token already ended the request (STOP / LENGTH).
  * decode role: ``add_prefilled`` reserves blocks for the prompt's KV (written by a pull), then
    ``resume`` joins the running batch with the prefill's first token as output so far.
  * colocated (both roles on one engine): a held request is ``adopt``-ed: its blocks become the
    decode request's blocks (no copy, no pull) and it joins the running batch.
  * ``abort`` works in any state and frees every block.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from engine.config import DTYPES, EngineConfig, ModelConfig, load_config
from engine.distributed import StepBroadcaster
from engine.finish import FinishReason
from engine.kv_cache import BlockAllocator, CacheConfig, allocate_kv, kv_block_bytes
from engine.model import build_engine_model
from engine.model_runner import ModelRunner
from engine.sampling import SamplingParams
from engine.scheduler import Request, RequestStatus, Scheduler, SchedulerConfig
from engine.stop import StopStrings
from engine.tokenizer import Tokenizer
from engine.tp import TPInfo


@dataclass(slots=True)
class StepOutput:
    request_id: str
    token_ids: list[int]  # new tokens of this step
    logprobs: list[float]  # of those tokens (empty unless params.logprobs)
    finish_reason: FinishReason | None  # None: the request goes on


def resolve_cache_config(cfg: EngineConfig, model_cfg: ModelConfig, tp_size: int) -> CacheConfig:
    """The cache every rank allocates (explicit num_blocks, else sized from kv_cache_bytes)."""
    if cfg.num_blocks is not None:
        return CacheConfig(cfg.block_size, cfg.num_blocks)
    per_block = kv_block_bytes(model_cfg, cfg.block_size, tp_size, DTYPES[cfg.dtype])
    max_len = cfg.max_model_len or model_cfg.max_position_embeddings
    useful = cfg.max_num_seqs * -(-max_len // cfg.block_size)
    return CacheConfig(cfg.block_size, max(1, min(cfg.kv_cache_bytes // per_block, useful)))


class LLMEngine:
    """One engine per TP group (built on rank 0; other ranks run ``engine.distributed.run_follower``)."""

    def __init__(
        self,
        config: EngineConfig,
        tp: TPInfo | None = None,
        cache_config: CacheConfig | None = None,
    ) -> None:
        tp_size = tp.world_size if tp is not None else 1
        self.config = config
        self.model_config = load_config(config.model)
        self.cache_config = cache_config or resolve_cache_config(config, self.model_config, tp_size)
        self.max_model_len = config.max_model_len or self.model_config.max_position_embeddings
        self.tokenizer = Tokenizer.from_model_dir(config.model)
        self._stop_strings = StopStrings(self.tokenizer)
        device = torch.device(config.device)
        dtype = DTYPES[config.dtype]
        self.model = build_engine_model(config.model, dtype, tp, device, config.quantization)
        self.kv = allocate_kv(self.model_config, self.cache_config, tp_size, dtype, device)
        self.broadcaster = None
        if tp is not None and tp.world_size > 1:
            self.broadcaster = StepBroadcaster(tp, device)
        self.runner = ModelRunner(self.model, self.kv, self.cache_config.block_size, self.broadcaster)
        self.allocator = BlockAllocator(self.cache_config.num_blocks, self.cache_config.block_size)
        sched_cfg = SchedulerConfig(config.max_num_batched_tokens, config.max_num_seqs)
        self.scheduler = Scheduler(sched_cfg, self.allocator)
        self.requests: dict[str, Request] = {}
        self._pending: list[StepOutput] = []
        self._rng = random.Random(config.seed)
        self.num_preemptions = 0

    # ---- counters ---------------------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        return self.allocator.num_free

    @property
    def num_total_blocks(self) -> int:
        return self.allocator.num_blocks

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    @property
    def prefix_cache_hit_blocks(self) -> int:
        return self.allocator.prefix_hit_blocks

    # ---- requests ---------------------------------------------------------------------------

    def add_request(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, *, hold_kv: bool = False
    ) -> None:
        """Queue a request; raises ValueError if it is malformed or can never fit the KV pool."""
        req = self._new_request(request_id, prompt_token_ids, params, hold_kv=hold_kv)
        req.hold_kv = hold_kv
        self.requests[request_id] = req
        self.scheduler.add(req)

    def kv_block_ids(self, request_id: str) -> list[int]:
        return list(self._get(request_id).block_table)

    def release_kv(self, request_id: str) -> None:
        """Free a held (hold_kv) request's blocks; unknown ids are ignored (already released)."""
        self.abort(request_id)

    def add_prefilled(
        self, request_id: str, prompt_token_ids: list[int], first_token: int, params: SamplingParams
    ) -> list[int] | None:
        """Decode role: reserve blocks for the prompt's KV; None when there is no room now."""
        req = self._new_request(request_id, prompt_token_ids, params)
        needed = -(-len(prompt_token_ids) // self.cache_config.block_size)
        if needed > self.allocator.num_free:
            return None
        req.block_table = self.allocator.allocate(needed)
        req.output_token_ids = [first_token]
        req.num_computed_tokens = len(prompt_token_ids)
        req.status = RequestStatus.AWAITING_KV
        self.requests[request_id] = req
        return list(req.block_table)

    def resume(self, request_id: str) -> None:
        """The prompt's KV has arrived: join the running batch."""
        req = self._get(request_id)
        if req.status != RequestStatus.AWAITING_KV:
            raise ValueError(f"request {request_id!r} is {req.status.value}, not awaiting KV")
        self.scheduler.resume(req)
        reason = self._stop_reason(req, req.output_token_ids[-1])
        if reason is not None:
            self._finish(req, reason)
            self._pending.append(StepOutput(request_id, [], [], reason))

    def adopt(self, request_id: str, params: SamplingParams) -> None:
        """Colocated decode: a HELD request (hold_kv, after its first token) becomes a running decode
        request on the same blocks, with the decode's sampling params (a fresh seeded generator,
        as a decode replica that pulled the KV would have). Raises KeyError / ValueError."""
        req = self._get(request_id)
        if req.status != RequestStatus.HELD:
            raise ValueError(f"request {request_id!r} is {req.status.value}, not held after prefill")
        self._validate_prompt(req.prompt_token_ids, params.max_tokens)
        req.params, req.generator = params, self._generator(params)
        req.hold_kv, req.finish_reason = False, None
        self.scheduler.resume(req)
        reason = self._stop_reason(req, req.output_token_ids[-1])
        if reason is not None:
            self._finish(req, reason)
            self._pending.append(StepOutput(request_id, [], [], reason))

    def abort(self, request_id: str) -> None:
        """Drop a request in any state and free its blocks; unknown ids are ignored."""
        req = self.requests.pop(request_id, None)
        self._stop_strings.forget(request_id)
        if req is not None:
            self.scheduler.remove(req)

    def has_work(self) -> bool:
        return self.scheduler.has_work() or bool(self._pending)

    # ---- the step ---------------------------------------------------------------------------

    def step(self) -> list[StepOutput]:
        """Schedule, run the model, sample, apply stop conditions."""
        outputs, self._pending = self._pending, []
        plan = self.scheduler.schedule()
        self.num_preemptions += len(plan.preempted)
        if not plan.seqs:
            return outputs
        tokens, logprobs = self.runner.run(plan)
        self.scheduler.update(plan)
        sampled = [s.request for s in plan.seqs if s.samples]
        for req, token, logprob in zip(sampled, tokens, logprobs, strict=True):
            outputs.append(self._append_token(req, token, logprob))
        return outputs

    def _append_token(self, req: Request, token: int, logprob: float) -> StepOutput:
        req.output_token_ids.append(token)
        lps = [logprob] if req.params.logprobs else []
        if req.params.logprobs:
            req.output_logprobs.append(logprob)
        reason = self._stop_reason(req, token)
        if reason is None and req.hold_kv:
            reason = FinishReason.PREFILLED
        if reason is not None:
            self._finish(req, reason)
        return StepOutput(req.request_id, [token], lps, reason)

    def _stop_reason(self, req: Request, token: int) -> FinishReason | None:
        p = req.params
        if not p.ignore_eos and token in self.model_config.eos_token_ids:
            return FinishReason.STOP
        if token in p.stop_token_ids:
            return FinishReason.STOP
        if p.stop and self._stop_strings.reached(req.request_id, p.stop, req.output_token_ids):
            return FinishReason.STOP
        if len(req.output_token_ids) >= p.max_tokens or req.num_tokens >= self.max_model_len:
            return FinishReason.LENGTH
        return None

    def _finish(self, req: Request, reason: FinishReason) -> None:
        self.scheduler.finish(req, reason)
        self._stop_strings.forget(req.request_id)
        if not req.hold_kv:
            del self.requests[req.request_id]

    def _get(self, request_id: str) -> Request:
        try:
            return self.requests[request_id]
        except KeyError:
            raise KeyError(f"unknown request {request_id!r}") from None

    def _new_request(
        self, request_id: str, prompt: list[int], params: SamplingParams, hold_kv: bool = False
    ) -> Request:
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        self._validate_prompt(prompt, 1 if hold_kv else params.max_tokens)
        return Request(request_id, list(prompt), params, self._generator(params))

    def _generator(self, params: SamplingParams) -> torch.Generator:
        gen = torch.Generator(device=self.kv.device)
        gen.manual_seed(params.seed if params.seed is not None else self._rng.getrandbits(63))
        return gen

    def _validate_prompt(self, prompt: list[int], max_new_tokens: int) -> None:
        if not prompt:
            raise ValueError("prompt_token_ids must not be empty")
        vocab = self.model_config.vocab_size
        bad = next((t for t in prompt if not 0 <= t < vocab), None)
        if bad is not None:
            raise ValueError(f"prompt token id {bad} is outside the vocabulary [0, {vocab})")
        if len(prompt) >= self.max_model_len:
            raise ValueError(
                f"prompt has {len(prompt)} tokens; the context window is {self.max_model_len}"
            )
        worst = min(len(prompt) + max_new_tokens, self.max_model_len)
        capacity = self.cache_config.num_blocks * self.cache_config.block_size
        if worst > capacity:
            raise ValueError(
                f"request needs up to {worst} tokens of KV cache (prompt {len(prompt)} + "
                f"{max_new_tokens} new) but the whole pool holds {capacity}"
            )

    def shutdown(self) -> None:
        """Stop the follower ranks (TP); the engine cannot step afterwards."""
        if self.broadcaster is not None:
            self.broadcaster.stop()
