"""Prefix hashes of a prompt's leading full KV blocks, for prefill prefix affinity.

The same function as engine.kv_cache.hash_block / prefix_block_hashes (the hashes workers report in
WorkerStatus.prefix_hashes), restated here so the router does not load torch;
tests/test_router_units.py checks that both agree. Block i's hash covers (block i-1's hash, block
i's token ids), so equal hashes mean equal prefixes.
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Sequence

NO_HASH = -1  # the parent of the first block
_MASK = (1 << 63) - 1


def hash_block(parent: int, token_ids: Sequence[int]) -> int:
    """63-bit hash of one full block given its parent block's hash."""
    h = hashlib.blake2b(digest_size=8)
    h.update(parent.to_bytes(8, "little", signed=True))
    h.update(array("q", token_ids).tobytes())
    return int.from_bytes(h.digest(), "little") & _MASK


def hash_blocks(token_ids: Sequence[int], block_size: int, max_blocks: int | None = None) -> list[int]:
    """Hashes of the leading full blocks (a partial last block has none), at most max_blocks."""
    n = len(token_ids) // block_size
    if max_blocks is not None:
        n = min(n, max_blocks)
    hashes: list[int] = []
    parent = NO_HASH
    for i in range(n):
        parent = hash_block(parent, token_ids[i * block_size : (i + 1) * block_size])
        hashes.append(parent)
    return hashes
