from __future__ import annotations

import pytest

from engine.kv_cache import BlockAllocator, CacheConfig, hash_block, prefix_block_hashes


def test_allocate_and_free_counts() -> None:
    a = BlockAllocator(num_blocks=8, block_size=4)
    ids = a.allocate(3)
    assert len(set(ids)) == 3 and a.num_free == 5
    a.free(ids)
    assert a.num_free == 8
    with pytest.raises(RuntimeError, match="double free"):
        a.free(ids[:1])
    with pytest.raises(RuntimeError, match="need 9"):
        a.allocate(9)


def test_prefix_hit_shares_block_with_ref_count() -> None:
    a = BlockAllocator(num_blocks=8, block_size=4)
    tokens = list(range(10))
    table = a.allocate(3)
    h0 = a.register(table[0], -1, tokens[0:4])
    a.register(table[1], h0, tokens[4:8])
    hit = a.lookup_prefix(tokens + [99], max_blocks=10)
    assert hit == table[:2]
    a.acquire(hit)
    assert a.blocks[table[0]].ref_count == 2 and a.prefix_hit_blocks == 2
    # a different first block breaks the chain
    assert a.lookup_prefix([7] + tokens[1:], max_blocks=10) == []
    assert a.lookup_prefix(tokens, max_blocks=1) == table[:1]


def test_freed_cached_blocks_stay_reusable_then_evicted_lru() -> None:
    a = BlockAllocator(num_blocks=4, block_size=2)
    t1, t2 = [1, 2], [3, 4]
    b1, b2 = a.allocate(1)[0], a.allocate(1)[0]
    a.register(b1, -1, t1)
    a.register(b2, -1, t2)
    a.free([b1])
    a.free([b2])
    assert a.num_free == 4
    assert a.lookup_prefix(t1, 1) == [b1]
    a.acquire([b1])  # reuse of a free cached block takes it out of the free list
    assert a.num_free == 3
    a.free([b1])  # b1 now most recently freed
    fresh = a.allocate(3)  # two never-hashed blocks, then the LRU cached one (b2)
    assert b2 in fresh and b1 not in fresh
    assert a.lookup_prefix(t2, 1) == [] and a.lookup_prefix(t1, 1) == [b1]


def test_hash_is_chained_and_stable() -> None:
    assert hash_block(-1, [1, 2, 3]) == hash_block(-1, [1, 2, 3])
    assert hash_block(-1, [1, 2, 3]) != hash_block(5, [1, 2, 3])
    hs = prefix_block_hashes(list(range(9)), 4)
    assert len(hs) == 2 and hs[1] == hash_block(hs[0], [4, 5, 6, 7])


def test_allocate_kv_layout() -> None:
    from types import SimpleNamespace

    import torch

    from engine.kv_cache import allocate_kv

    cfg = SimpleNamespace(num_layers=2, num_kv_heads=4, head_dim=8)
    kv = allocate_kv(cfg, CacheConfig(block_size=16, num_blocks=5), 2, torch.float32, "cpu")  # type: ignore[arg-type]
    assert kv.shape == (5, 2, 2, 2, 16, 8) and kv[3].is_contiguous()
    with pytest.raises(ValueError, match="divisible"):
        allocate_kv(cfg, CacheConfig(), 3, torch.float32, "cpu")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="block_size"):
        CacheConfig(block_size=0)
