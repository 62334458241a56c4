"""Prefix hashes of a prompt's leading full KV blocks, for prefill prefix affinity.

Block i's hash covers (block i-1's hash, block i's token ids), so equal hashes mean equal prefixes.
Workers report the hashes of prefixes they cache (WorkerStatus.prefix_hashes) with this function.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence


def hash_block(parent: int, token_ids: Sequence[int]) -> int:
    """64-bit hash of one full block given its parent block's hash (0 for the first block)."""
    h = hashlib.blake2b(digest_size=8)
    h.update(struct.pack("<Q", parent))
    h.update(struct.pack(f"<{len(token_ids)}I", *token_ids))
    return int.from_bytes(h.digest(), "little")


def hash_blocks(token_ids: Sequence[int], block_size: int, max_blocks: int | None = None) -> list[int]:
    """Hashes of the leading full blocks (a partial last block has none)."""
    n = len(token_ids) // block_size
    if max_blocks is not None:
        n = min(n, max_blocks)
    hashes: list[int] = []
    parent = 0
    for i in range(n):
        parent = hash_block(parent, token_ids[i * block_size : (i + 1) * block_size])
        hashes.append(parent)
    return hashes
