"""Paged KV cache: the per-rank cache tensor and the block allocator with prefix caching.

Layout (docs/structures.md): one tensor per rank,
``kv: [num_blocks, num_layers, 2, num_kv_heads_local, block_size, head_dim]``, so ``kv[b]`` (one
block, every layer, K and V, this rank's heads) is contiguous.

Prefix caching (nano-vllm style): every FULL block whose KV has been computed is hashed by
``(parent hash, its token ids)``. A new request reuses the cached full blocks of its prefix
(reference count + 1). A freed block keeps its hash and stays reusable until it is evicted, least
recently freed first.
"""

from __future__ import annotations

import hashlib
import math
import mmap
import os
import weakref
from array import array
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from engine.config import BLOCK_SIZE
from engine.tp import kv_heads_per_rank, tp_kv_error

if TYPE_CHECKING:
    from engine.config import ModelConfig

NO_HASH = -1


@dataclass(frozen=True, slots=True)
class CacheConfig:
    block_size: int = BLOCK_SIZE
    num_blocks: int = 512

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise ValueError(f"CacheConfig.block_size must be >= 1, got {self.block_size}")
        if self.num_blocks < 1:
            raise ValueError(f"CacheConfig.num_blocks must be >= 1, got {self.num_blocks}")


def kv_block_bytes(cfg: ModelConfig, block_size: int, tp_size: int, dtype: torch.dtype) -> int:
    """Bytes of one block on one rank (all layers, K and V, this rank's heads)."""
    heads = kv_heads_per_rank(cfg.num_kv_heads, tp_size)
    elem = torch.empty((), dtype=dtype).element_size()
    return cfg.num_layers * 2 * heads * block_size * cfg.head_dim * elem


def allocate_kv(
    cfg: ModelConfig, cache: CacheConfig, tp_size: int, dtype: torch.dtype, device: torch.device | str
) -> torch.Tensor:
    """The whole cache of one rank: [num_blocks, num_layers, 2, H_local, block_size, head_dim]
    (H_local = num_kv_heads / tp_size, or 1 replicated head when tp_size exceeds num_kv_heads)."""
    error = tp_kv_error(cfg.num_kv_heads, tp_size)
    if error is not None:
        raise ValueError(error)
    shape = (
        cache.num_blocks,
        cfg.num_layers,
        2,
        kv_heads_per_rank(cfg.num_kv_heads, tp_size),
        cache.block_size,
        cfg.head_dim,
    )
    if torch.device(device).type == "cpu" and hasattr(os, "memfd_create"):
        return shareable_zeros(shape, dtype)
    return torch.zeros(shape, dtype=dtype, device=device)


@dataclass(frozen=True, slots=True)
class SharedPool:
    """A CPU cache tensor's memfd: another process on this host (same user) maps it read-only
    through /proc/<pid>/fd/<fd> and copies blocks out itself (kv_transfer's same-host read)."""

    pid: int
    fd: int
    inode: int


def shareable_zeros(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Zeros in a memfd mapping (a new memfd reads as zeros). The fd is closed when the tensor is
    freed; the mapping lives while any view of it does."""
    nbytes = math.prod(shape) * dtype.itemsize
    fd = os.memfd_create("pdserve-kv", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, nbytes)
        # pages allocated and mapped now, as torch.zeros would: no first-touch faults in a step
        mapping = mmap.mmap(fd, nbytes, flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0))
    except BaseException:
        os.close(fd)
        raise
    kv = torch.frombuffer(mapping, dtype=torch.uint8).view(dtype).view(shape)
    kv._pdserve_shared = SharedPool(os.getpid(), fd, os.fstat(fd).st_ino)  # type: ignore[attr-defined]
    weakref.finalize(kv, os.close, fd)
    return kv


def shared_pool(kv: torch.Tensor) -> SharedPool | None:
    """The memfd behind a cache tensor from allocate_kv, if it has one (CPU on Linux)."""
    pool = getattr(kv, "_pdserve_shared", None)
    return pool if isinstance(pool, SharedPool) and pool.pid == os.getpid() else None


def hash_block(parent_hash: int, token_ids: Sequence[int]) -> int:
    """Stable (cross-process) 63-bit hash of a full block given its parent block's hash."""
    h = hashlib.blake2b(digest_size=8)
    h.update(parent_hash.to_bytes(8, "little", signed=True))
    h.update(array("q", token_ids).tobytes())
    return int.from_bytes(h.digest(), "little") & ((1 << 63) - 1)


def prefix_block_hashes(token_ids: Sequence[int], block_size: int) -> list[int]:
    """Hashes of every full block of ``token_ids`` (chained: each covers the whole prefix)."""
    hashes: list[int] = []
    parent = NO_HASH
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent = hash_block(parent, token_ids[start : start + block_size])
        hashes.append(parent)
    return hashes


@dataclass(slots=True)
class Block:
    block_id: int
    ref_count: int = 0
    hash: int = NO_HASH
    token_ids: tuple[int, ...] = field(default_factory=tuple)


class BlockAllocator:
    """Reference-counted blocks; free blocks with a known hash stay reusable until evicted (LRU)."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.hash_to_block: dict[int, int] = {}
        # free (ref_count == 0) blocks, least recently freed first
        self.free_ids: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.prefix_hit_blocks = 0

    @property
    def num_free(self) -> int:
        return len(self.free_ids)

    def allocate(self, n: int) -> list[int]:
        """``n`` fresh blocks (evicting the least recently freed cached ones). Raises if short."""
        if n > self.num_free:
            raise RuntimeError(f"need {n} KV blocks, only {self.num_free} free")
        ids = []
        for _ in range(n):
            block_id, _ = self.free_ids.popitem(last=False)
            self._forget_hash(self.blocks[block_id])
            self.blocks[block_id].ref_count = 1
            ids.append(block_id)
        return ids

    def lookup_prefix(self, token_ids: Sequence[int], max_blocks: int) -> list[int]:
        """Cached blocks holding the longest computed prefix of ``token_ids`` (no side effects)."""
        found: list[int] = []
        parent = NO_HASH
        for i in range(min(max_blocks, len(token_ids) // self.block_size)):
            chunk = tuple(token_ids[i * self.block_size : (i + 1) * self.block_size])
            parent = hash_block(parent, chunk)
            block_id = self.hash_to_block.get(parent)
            if block_id is None or self.blocks[block_id].token_ids != chunk:
                break
            found.append(block_id)
        return found

    def acquire(self, block_ids: Sequence[int]) -> None:
        """Take one more reference on cached blocks (a prefix-cache hit)."""
        for block_id in block_ids:
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self.free_ids[block_id]
            block.ref_count += 1
        self.prefix_hit_blocks += len(block_ids)

    def free(self, block_ids: Sequence[int]) -> None:
        """Drop one reference each; unreferenced blocks become free but keep their hash."""
        for block_id in reversed(block_ids):  # tail blocks are evicted first
            block = self.blocks[block_id]
            if block.ref_count <= 0:
                raise RuntimeError(f"double free of KV block {block_id}")
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free_ids[block_id] = None

    def register(self, block_id: int, parent_hash: int, token_ids: Sequence[int]) -> int:
        """Mark a full, computed block as reusable under ``hash(parent, tokens)``; returns it."""
        block = self.blocks[block_id]
        h = hash_block(parent_hash, token_ids)
        if block.hash != h:
            self._forget_hash(block)
            block.hash = h
            block.token_ids = tuple(token_ids)
            self.hash_to_block[h] = block_id
        return h

    def _forget_hash(self, block: Block) -> None:
        if block.hash != NO_HASH and self.hash_to_block.get(block.hash) == block.block_id:
            del self.hash_to_block[block.hash]
        block.hash = NO_HASH
        block.token_ids = ()
