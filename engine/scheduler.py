"""Continuous-batching scheduler with chunked prefill, prefix caching and preemption by recompute.

Each step the scheduler plans which tokens run, under ``max_num_batched_tokens`` and
``max_num_seqs``:

1. running requests in the decode phase (one token each), oldest first;
2. running requests still prefilling, one chunk each (chunked prefill);
3. waiting requests, admitted in order, first reusing cached full blocks of their prefix.

When blocks run out, the newest running request not yet planned this step is preempted by
recompute: its blocks are freed and it is requeued at the front (its output tokens are kept and
recomputed as context later). Nothing fails and nothing is truncated.
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass, field

import torch

from engine.config import MAX_NUM_BATCHED_TOKENS, MAX_NUM_SEQS
from engine.kv_cache import NO_HASH, BlockAllocator
from engine.sampling import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"  # queued for (re)prefill
    RUNNING = "running"
    AWAITING_KV = "awaiting_kv"  # decode role: blocks reserved, KV being pulled in
    HELD = "held"  # prefill role: finished, blocks kept until release_kv
    FINISHED = "finished"


@dataclass(slots=True, eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    generator: torch.Generator
    output_token_ids: list[int] = field(default_factory=list)
    output_logprobs: list[float] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    num_computed_tokens: int = 0
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)  # of block_table's computed full blocks
    hold_kv: bool = False
    finish_reason: str | None = None
    num_preemptions: int = 0
    num_cached_tokens: int = 0  # prompt tokens served by the prefix cache at (re)admission

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def is_decoding(self) -> bool:
        return self.num_tokens - self.num_computed_tokens == 1 and bool(self.output_token_ids)

    def token_ids(self, start: int, end: int) -> list[int]:
        """Tokens [start, end) of prompt + output."""
        p = len(self.prompt_token_ids)
        if end <= p:
            return self.prompt_token_ids[start:end]
        return (self.prompt_token_ids[start:] if start < p else []) + self.output_token_ids[
            max(start - p, 0) : end - p
        ]


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    max_num_batched_tokens: int = MAX_NUM_BATCHED_TOKENS
    max_num_seqs: int = MAX_NUM_SEQS

    def __post_init__(self) -> None:
        if self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}")
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")


@dataclass(slots=True)
class ScheduledSeq:
    request: Request
    start: int  # tokens already in the cache before this step
    num_new_tokens: int

    @property
    def samples(self) -> bool:
        """True when this chunk reaches the sequence's end, so a token is sampled."""
        return self.start + self.num_new_tokens == self.request.num_tokens


@dataclass(slots=True)
class StepPlan:
    seqs: list[ScheduledSeq]  # decode tokens first, then prefill chunks
    preempted: list[Request] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.seqs)


class Scheduler:
    def __init__(self, cfg: SchedulerConfig, allocator: BlockAllocator) -> None:
        self.cfg = cfg
        self.allocator = allocator
        self.block_size = allocator.block_size
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # admission order, newest last

    def add(self, req: Request) -> None:
        req.status = RequestStatus.WAITING
        self.waiting.append(req)

    def resume(self, req: Request) -> None:
        """A request whose KV was written from outside (decode role) joins the running batch."""
        req.status = RequestStatus.RUNNING
        self._register_full_blocks(req)
        self.running.append(req)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- planning -------------------------------------------------------------------------

    def schedule(self) -> StepPlan:
        plan = StepPlan(seqs=[])
        planned: set[str] = set()
        budget = self.cfg.max_num_batched_tokens
        for decoding in (True, False):
            for req in list(self.running):
                if budget == 0 or req.request_id in planned or req.status != RequestStatus.RUNNING:
                    continue
                if req.is_decoding != decoding:
                    continue
                n = min(req.num_tokens - req.num_computed_tokens, budget)
                if not decoding:  # a prefill chunk shrinks to the free room before preempting
                    n = min(n, max(1, self._room(req)))
                if self._reserve_running(req, n, planned, plan):
                    plan.seqs.append(ScheduledSeq(req, req.num_computed_tokens, n))
                    planned.add(req.request_id)
                    budget -= n
        if not plan.preempted:
            self._admit_waiting(plan, budget)
        return plan

    def _reserve_running(self, req: Request, n: int, planned: set[str], plan: StepPlan) -> bool:
        """Blocks for ``n`` more tokens of ``req``, preempting newer requests; False if ``req`` itself was."""
        needed = self._blocks_needed(req, req.num_computed_tokens + n)
        while needed > self.allocator.num_free:
            victim = next(
                (r for r in reversed(self.running) if r is not req and r.request_id not in planned),
                req,
            )
            self._preempt(victim, plan)
            if victim is req:
                return False
        self._extend(req, needed)
        return True

    def _admit_waiting(self, plan: StepPlan, budget: int) -> None:
        while self.waiting and budget > 0 and len(self.running) < self.cfg.max_num_seqs:
            req = self.waiting[0]
            n = self._admit(req, budget)
            if n == 0:
                break
            self.waiting.popleft()
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            plan.seqs.append(ScheduledSeq(req, req.num_computed_tokens, n))
            budget -= n

    def _admit(self, req: Request, budget: int) -> int:
        """Give ``req`` its cached prefix + blocks for its first chunk; returns the chunk (0 = no room)."""
        bs = self.block_size
        cached = self.allocator.lookup_prefix(req.all_token_ids, (req.num_tokens - 1) // bs)
        cached_free = sum(1 for b in cached if self.allocator.blocks[b].ref_count == 0)
        free_after = self.allocator.num_free - cached_free
        start = len(cached) * bs
        n = min(req.num_tokens - start, budget)
        # shrink the chunk to the free blocks (the last cached block is full, so no slack)
        n = min(n, free_after * bs)
        if n <= 0:
            return 0
        self.allocator.acquire(cached)
        req.block_table = list(cached)
        req.block_hashes = [self.allocator.blocks[b].hash for b in cached]
        req.num_computed_tokens = start
        req.num_cached_tokens = start
        self._extend(req, self._blocks_needed(req, start + n))
        return n

    def _room(self, req: Request) -> int:
        """Tokens ``req`` can still add without preempting anyone."""
        capacity = (len(req.block_table) + self.allocator.num_free) * self.block_size
        return capacity - req.num_computed_tokens

    def _blocks_needed(self, req: Request, num_tokens: int) -> int:
        return max(0, -(-num_tokens // self.block_size) - len(req.block_table))

    def _extend(self, req: Request, n: int) -> None:
        if n:
            req.block_table.extend(self.allocator.allocate(n))

    def _preempt(self, req: Request, plan: StepPlan) -> None:
        self.running.remove(req)
        self._free_blocks(req)
        req.num_computed_tokens = 0
        req.num_preemptions += 1
        req.status = RequestStatus.WAITING
        self.waiting.appendleft(req)
        plan.preempted.append(req)

    # ---- after the forward pass ---------------------------------------------------------------

    def update(self, plan: StepPlan) -> None:
        """Account the computed tokens and publish newly full blocks to the prefix cache.

        Call before appending the sampled tokens (a sampled token has no KV yet).
        """
        for s in plan.seqs:
            req = s.request
            req.num_computed_tokens = s.start + s.num_new_tokens
            self._register_full_blocks(req)

    def _register_full_blocks(self, req: Request) -> None:
        bs = self.block_size
        for i in range(len(req.block_hashes), req.num_computed_tokens // bs):
            parent = req.block_hashes[-1] if req.block_hashes else NO_HASH
            tokens = req.token_ids(i * bs, (i + 1) * bs)
            req.block_hashes.append(self.allocator.register(req.block_table[i], parent, tokens))

    # ---- leaving ------------------------------------------------------------------------------

    def finish(self, req: Request, reason: str) -> None:
        """Stop a running request; a ``hold_kv`` request keeps its blocks (status HELD)."""
        if req in self.running:
            self.running.remove(req)
        req.finish_reason = reason
        if req.hold_kv:
            req.status = RequestStatus.HELD
        else:
            self._free_blocks(req)
            req.status = RequestStatus.FINISHED

    def remove(self, req: Request) -> None:
        """Abort/release: drop ``req`` from any queue and free every block it holds."""
        if req in self.running:
            self.running.remove(req)
        if req in self.waiting:
            self.waiting.remove(req)
        self._free_blocks(req)
        req.status = RequestStatus.FINISHED

    def _free_blocks(self, req: Request) -> None:
        self.allocator.free(req.block_table)
        req.block_table = []
        req.block_hashes = []
