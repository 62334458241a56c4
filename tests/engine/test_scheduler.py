from __future__ import annotations

import torch

from engine.kv_cache import BlockAllocator
from engine.sampling import SamplingParams
from engine.scheduler import Request, RequestStatus, Scheduler, SchedulerConfig, StepPlan


def _req(rid: str, prompt: list[int], max_tokens: int = 4) -> Request:
    return Request(rid, prompt, SamplingParams(max_tokens=max_tokens), torch.Generator())


def _step(s: Scheduler) -> StepPlan:
    """One fake model step: next token = sum(context) % 97; stop at max_tokens."""
    plan = s.schedule()
    s.update(plan)
    for seq in plan.seqs:
        req = seq.request
        assert len(req.block_table) * s.block_size >= req.num_computed_tokens
        if seq.samples:
            req.output_token_ids.append(sum(req.all_token_ids) % 97)
            if len(req.output_token_ids) >= req.params.max_tokens:
                s.finish(req, "length")
    return plan


def _run(s: Scheduler, reqs: list[Request]) -> list[StepPlan]:
    for r in reqs:
        s.add(r)
    plans = []
    while s.has_work():
        plans.append(_step(s))
        assert len(plans) < 1000
    return plans


def test_chunked_prefill_respects_token_budget_and_decodes_first() -> None:
    s = Scheduler(SchedulerConfig(max_num_batched_tokens=8, max_num_seqs=4), BlockAllocator(64, 4))
    short, long = _req("a", [1, 2, 3], 6), _req("b", list(range(30)), 2)
    plans = _run(s, [short, long])
    assert all(p.num_tokens <= 8 for p in plans)
    # b's 30-token prompt needed several chunks while a decoded first in each step
    mixed = [p for p in plans if len(p.seqs) == 2]
    assert mixed and all(p.seqs[0].request is short and p.seqs[0].num_new_tokens == 1 for p in mixed[1:])
    assert len(short.output_token_ids) == 6 and len(long.output_token_ids) == 2
    assert s.allocator.num_free == 64


def test_max_num_seqs_limits_running() -> None:
    s = Scheduler(SchedulerConfig(max_num_batched_tokens=64, max_num_seqs=2), BlockAllocator(64, 4))
    plans = _run(s, [_req(str(i), [i + 1] * 5) for i in range(5)])
    assert max(len(p.seqs) for p in plans) == 2


def test_preemption_by_recompute_gives_same_tokens_and_frees_all() -> None:
    def outputs(num_blocks: int) -> tuple[list[list[int]], int]:
        s = Scheduler(SchedulerConfig(max_num_batched_tokens=32, max_num_seqs=8), BlockAllocator(num_blocks, 4))
        reqs = [_req(str(i), [i + 3] * (5 + i), 12) for i in range(6)]
        plans = _run(s, reqs)
        assert s.allocator.num_free == num_blocks
        assert all(r.status == RequestStatus.FINISHED for r in reqs)
        return [r.output_token_ids for r in reqs], sum(len(p.preempted) for p in plans)

    big, n_big = outputs(128)
    small, n_small = outputs(8)  # 8 blocks * 4 = 32 tokens for 6 requests of up to 22 tokens
    assert n_big == 0 and n_small > 0
    assert small == big


def test_preempts_newest_first() -> None:
    s = Scheduler(SchedulerConfig(max_num_batched_tokens=64, max_num_seqs=8), BlockAllocator(4, 4))
    old, new = _req("old", [1, 2, 3], 8), _req("new", [4, 5, 6], 8)
    s.add(old)
    s.add(new)
    preempted: list[Request] = []
    while not preempted:
        preempted = _step(s).preempted
    assert preempted == [new] and s.waiting[0] is new and new.block_table == []


def test_prefix_cache_hit_skips_cached_blocks() -> None:
    s = Scheduler(SchedulerConfig(), BlockAllocator(32, 4))
    prefix = list(range(10, 18))  # two full blocks
    first = _req("a", prefix + [1, 2], 2)
    _run(s, [first])
    second = _req("b", prefix + [3, 4, 5], 2)
    s.add(second)
    plan = _step(s)
    assert plan.seqs[0].start == 8 and plan.seqs[0].num_new_tokens == 3
    assert second.num_cached_tokens == 8 and s.allocator.prefix_hit_blocks == 2
    _run(s, [])
    # a fully cached prompt still recomputes its last token to get logits
    third = _req("c", prefix, 1)
    s.add(third)
    plan = _step(s)
    assert plan.seqs[0].start == 4 and plan.seqs[0].num_new_tokens == 4
    _run(s, [])
    assert s.allocator.num_free == 32


def test_hold_kv_keeps_blocks_until_removed() -> None:
    s = Scheduler(SchedulerConfig(), BlockAllocator(16, 4))
    r = _req("h", list(range(9)), 1)
    r.hold_kv = True
    _run(s, [r])
    assert r.status == RequestStatus.HELD and len(r.block_table) == 3
    assert s.allocator.num_free == 13
    s.remove(r)
    assert s.allocator.num_free == 16
