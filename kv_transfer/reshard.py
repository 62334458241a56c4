"""Head re-sharding between a prefill TP group and a decode TP group.

Rank r of a TP group of size t holds the global KV heads [r * H/t, (r+1) * H/t). A decode rank
pulls, from every prefill rank whose heads overlap its own, the overlapping heads, and writes
them into `kv[dst_blocks, :, :, dst_heads]`.
"""

from __future__ import annotations

from dataclasses import dataclass

from kv_transfer.base import TransferError


@dataclass(frozen=True, slots=True)
class PullPlan:
    src_rank: int
    src_heads: tuple[int, int]  # [start, end) in the source rank's local heads
    dst_heads: tuple[int, int]  # [start, end) in the decode rank's local heads


def plan_pulls(prefill_tp: int, decode_tp: int, decode_rank: int, num_kv_heads: int) -> list[PullPlan]:
    """The pulls decode rank `decode_rank` makes, in source-rank order."""
    if prefill_tp <= 0 or decode_tp <= 0 or not 0 <= decode_rank < decode_tp:
        raise TransferError(f"bad TP sizes: prefill {prefill_tp}, decode {decode_tp} rank {decode_rank}")
    if num_kv_heads % prefill_tp or num_kv_heads % decode_tp:
        raise TransferError(
            f"num_kv_heads={num_kv_heads} must be divisible by prefill TP {prefill_tp} "
            f"and decode TP {decode_tp}"
        )
    src_per_rank = num_kv_heads // prefill_tp
    dst_per_rank = num_kv_heads // decode_tp
    lo, hi = decode_rank * dst_per_rank, (decode_rank + 1) * dst_per_rank
    plans = []
    for src in range(lo // src_per_rank, (hi - 1) // src_per_rank + 1):
        start = max(lo, src * src_per_rank)
        end = min(hi, (src + 1) * src_per_rank)
        src_base = src * src_per_rank
        plans.append(PullPlan(src, (start - src_base, end - src_base), (start - lo, end - lo)))
    return plans
