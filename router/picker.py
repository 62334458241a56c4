"""Picking replicas for a request: which prefill replica, which decode replica, and when the decode
replica prefills the prompt itself.

Prefill: least outstanding prompt tokens, with prefix affinity. Load = prompt tokens the router has in
flight there + the queue the replica last reported. The replicas within `max_imbalance` tokens of the
least loaded one are candidates; among them the one whose cached prefix (reported hashes, or the
router's memory of where it last sent the same prefix) covers the most leading blocks wins, then the
least loaded. Prefix hashes are the engine's (engine.kv_cache.prefix_block_hashes), so they match
the ones workers report in WorkerStatus.prefix_hashes.

Decode: most free KV blocks, then the lightest batch.

Prefill on the decode replica itself:
  * A KVHandle whose endpoints all start with `local://` names KV that stays in the engine that
    prefilled it (a colocated replica): only the replica at that same address can decode it, by
    adopting the blocks, with no transfer.
  * Conditional disaggregation (`local_prefill_max_tokens` > 0): the decode replica is picked as
    usual; if the prompt's tokens not already in its prefix cache are at most the threshold, that
    replica prefills the prompt itself.
  * Colocated mode: every PREFILL replica has a DECODE twin at the same address (one engine). Picking
    by prompt queue alone would pile the decodes on the first idle replica, so the pick is the
    decode picker's among the replicas whose prompt queue is within `max_imbalance` of the shortest.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from pdserve.v1 import kv_pb2
from pdserve.v1.kv_endpoints import LOCAL_KV_SCHEME

from engine.kv_cache import prefix_block_hashes
from router.config import RouterConfig
from router.registry import Replica


def hash_blocks(token_ids: Sequence[int], block_size: int, max_blocks: int | None = None) -> list[int]:
    """Hashes of the leading full blocks (a partial last block has none), at most max_blocks."""
    if max_blocks is not None:
        token_ids = token_ids[: max_blocks * block_size]
    return prefix_block_hashes(token_ids, block_size)


class AffinityMemory:
    """Bounded LRU: prefix-block hash -> replica id that last prefilled it."""

    def __init__(self, capacity: int = 65536) -> None:
        self.capacity = capacity
        self._last: OrderedDict[int, str] = OrderedDict()

    def record(self, hashes: Sequence[int], replica_id: str) -> None:
        for h in hashes:
            self._last[h] = replica_id
            self._last.move_to_end(h)
        while len(self._last) > self.capacity:
            self._last.popitem(last=False)

    def last(self, h: int) -> str | None:
        return self._last.get(h)


def prefill_load(r: Replica) -> int:
    return r.outstanding_prompt_tokens + r.status.queued_prompt_tokens


def matched_blocks(r: Replica, hashes: Sequence[int], memory: AffinityMemory) -> int:
    """Leading prompt blocks this replica likely has cached."""
    n = 0
    for h in hashes:
        if h not in r.prefix_hashes and memory.last(h) != r.replica_id:
            break
        n += 1
    return n


def pick_prefill(replicas: Sequence[Replica], hashes: Sequence[int], memory: AffinityMemory,
                 max_imbalance: int) -> Replica | None:
    if not replicas:
        return None
    floor = min(prefill_load(r) for r in replicas)
    candidates = [r for r in replicas if prefill_load(r) <= floor + max_imbalance]
    return max(candidates, key=lambda r: (matched_blocks(r, hashes, memory), -prefill_load(r)))


def free_blocks(r: Replica) -> int:
    return r.status.kv_blocks_free - r.reserved_blocks


def batch_load(r: Replica) -> int:
    return max(r.status.running + r.status.queued, r.open_streams)


def pick_decode(replicas: Sequence[Replica]) -> Replica | None:
    if not replicas:
        return None
    return max(replicas, key=lambda r: (free_blocks(r), -batch_load(r)))


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
