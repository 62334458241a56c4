"""Prefill on the decode replica itself: colocated mode and conditional disaggregation.

A KVHandle whose endpoints all start with `local://` names KV that stays in the engine that
prefilled it (a colocated replica): only the replica at that same address can decode it, by
adopting the blocks, with no transfer.

Conditional disaggregation (`local_prefill_max_tokens` > 0): the router first picks the decode
replica as usual; if the prompt's tokens not already in that replica's prefix cache (its reported
prefix hashes) are at most the threshold, that replica prefills the prompt itself.
"""

from __future__ import annotations

from collections.abc import Sequence

from pdserve.v1 import kv_pb2

from router.config import RouterConfig
from router.picker import pick_decode
from router.prefix import hash_blocks
from router.registry import Replica

LOCAL_KV_SCHEME = "local://"


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
