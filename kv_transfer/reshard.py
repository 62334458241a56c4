"""Head re-sharding between a prefill TP group and a decode TP group.

Rank r of a TP group of size t holds the global KV heads ``engine.tp.kv_head_range(H, t, r)``:
[r * H/t, (r+1) * H/t) when t divides H, else (t a multiple of H: replicated heads) the one head
r * H // t, which t / H ranks then hold alike. A decode rank pulls each global head it needs once,
from one prefill rank holding it (one on its own host when it can, else spread over the holders
by decode rank), in as few pulls as possible, and writes them into `kv[dst_blocks, :, :, dst_heads]`.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

from engine.tp import kv_head_range, tp_kv_error
from kv_transfer.interfaces import TransferError


@dataclass(frozen=True, slots=True)
class PullPlan:
    src_rank: int
    src_heads: tuple[int, int]  # [start, end) in the source rank's local heads
    dst_heads: tuple[int, int]  # [start, end) in the decode rank's local heads


def plan_pulls(prefill_tp: int, decode_tp: int, decode_rank: int, num_kv_heads: int,
               near: Collection[int] = ()) -> list[PullPlan]:
    """The pulls decode rank `decode_rank` makes, in destination-head order; `near`: prefill
    ranks on this rank's host (preferred sources of a replicated head)."""
    if prefill_tp <= 0 or decode_tp <= 0 or not 0 <= decode_rank < decode_tp:
        raise TransferError(f"bad TP sizes: prefill {prefill_tp}, decode {decode_tp} rank {decode_rank}")
    for side, tp in (("prefill", prefill_tp), ("decode", decode_tp)):
        error = tp_kv_error(num_kv_heads, tp)
        if error is not None:
            raise TransferError(f"{side} TP: {error}")
    sources = [kv_head_range(num_kv_heads, prefill_tp, r) for r in range(prefill_tp)]
    wanted = kv_head_range(num_kv_heads, decode_tp, decode_rank)
    plans: list[PullPlan] = []
    for head in wanted:
        src = _source(head, sources, decode_rank, near)
        s, d = head - sources[src].start, head - wanted.start
        last = plans[-1] if plans else None
        if last is not None and last.src_rank == src and last.src_heads[1] == s and last.dst_heads[1] == d:
            plans[-1] = PullPlan(src, (last.src_heads[0], s + 1), (last.dst_heads[0], d + 1))
        else:
            plans.append(PullPlan(src, (s, s + 1), (d, d + 1)))
    return plans


def _source(head: int, sources: list[range], decode_rank: int, near: Collection[int]) -> int:
    """The prefill rank to take `head` from: a near holder, else holders spread by decode rank."""
    holders = [r for r, heads in enumerate(sources) if head in heads]
    close = [r for r in holders if r in near] or holders
    return close[decode_rank % len(close)]
