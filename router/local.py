"""Prefill on the decode replica itself: colocated mode and conditional disaggregation.

A KVHandle whose endpoints all start with `local://` names KV that stays in the engine that
prefilled it (a colocated replica): only the replica at that same address can decode it, by
adopting the blocks, with no transfer.

Conditional disaggregation (`local_prefill_max_tokens` > 0): the router first picks the decode
replica as usual; if the prompt's tokens not already in that replica's prefix cache (its reported
prefix hashes) are at most the threshold, that replica prefills the prompt itself.

Colocated mode: every PREFILL replica has a DECODE twin at the same address (one engine). Picking by
prompt queue alone would send every short prompt to the first idle replica and pile the decodes
there, so the pick is the decode picker's (most free KV blocks, then the lightest batch) among the
replicas whose prompt queue is within `affinity_max_imbalance_tokens` of the shortest.
"""

from __future__ import annotations

from collections.abc import Sequence

from pdserve.v1 import kv_pb2
from pdserve.v1.kv_endpoints import LOCAL_KV_SCHEME

from router.config import RouterConfig
from router.picker import pick_decode, prefill_load
from router.prefix import hash_blocks
from router.registry import Replica


def is_local_kv(handle: kv_pb2.KVHandle) -> bool:
    return bool(handle.shards) and all(s.endpoint.startswith(LOCAL_KV_SCHEME) for s in handle.shards)


def pick_same_replica(replicas: Sequence[Replica], address: str) -> Replica | None:
    """The decode replica living at the prefill replica's address (the same process)."""
    return next((r for r in replicas if r.address == address), None)


def cached_tokens(r: Replica, prompt_ids: Sequence[int], block_size: int) -> int:
    """Leading prompt tokens whose KV blocks replica `r` reported in its prefix cache."""
    if not r.prefix_hashes:
        return 0
    n = 0
    for h in hash_blocks(prompt_ids, block_size):
        if h not in r.prefix_hashes:
            break
        n += 1
    return n * block_size


def pick_local_prefill(decode_replicas: Sequence[Replica], prompt_ids: Sequence[int],
                       cfg: RouterConfig) -> Replica | None:
    """The decode replica that should prefill this prompt itself, or None (use the prefill pool)."""
    limit = cfg.local_prefill_max_tokens
    if limit <= 0:
        return None
    best = pick_decode(decode_replicas)
    if best is None:
        return None
    uncached = len(prompt_ids) - cached_tokens(best, prompt_ids, cfg.block_size)
    return best if uncached <= limit else None


def pick_colocated(prefill_ready: Sequence[Replica], decode_ready: Sequence[Replica],
                   max_imbalance: int) -> Replica | None:
    """Colocated mode: the PREFILL-role replica to use; None unless every candidate has a twin."""
    twins = {r.address: r for r in decode_ready}
    if not prefill_ready or any(p.address not in twins for p in prefill_ready):
        return None
    floor = min(prefill_load(p) for p in prefill_ready)
    close = [p for p in prefill_ready if prefill_load(p) <= floor + max_imbalance]
    best = pick_decode([twins[p.address] for p in close])
    return next((p for p in close if best is not None and p.address == best.address), None)
