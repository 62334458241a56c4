"""Picking replicas. Prefill: least outstanding prompt tokens, with prefix affinity. Decode: most free
KV blocks, then the lightest batch.

Prefill load = prompt tokens the router has in flight there + the queue the replica last reported.
Affinity: the replicas within `max_imbalance` tokens of the least loaded one are candidates; among
them the one whose cached prefix (reported hashes, or the router's memory of where it last sent the
same prefix) covers the most leading blocks wins, then the least loaded.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from router.registry import Replica


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
