"""router/local.py on its own: local KV handles, colocated picking, conditional disaggregation."""

from __future__ import annotations

import asyncio
import dataclasses

from pdserve.v1 import kv_pb2, worker_pb2

from router.picker import (
    cached_tokens,
    hash_blocks,
    is_local_kv,
    pick_colocated,
    pick_local_prefill,
    pick_same_replica,
)
from router.registry import DECODE, PREFILL, Registry
from tests.fake_workers import make_config


def _status(rid: str, role: int, address: str, **fields: object) -> worker_pb2.WorkerStatus:
    return worker_pb2.WorkerStatus(replica_id=rid, role=role, address=address, ready=True,  # type: ignore[arg-type]
                                   block_size=16, **fields)


def test_local_handles_are_recognised() -> None:
    local = kv_pb2.KVHandle(shards=[kv_pb2.RankShard(endpoint="local://ab12")])
    remote = kv_pb2.KVHandle(shards=[kv_pb2.RankShard(endpoint="127.0.0.1:4000")])
    assert is_local_kv(local) and not is_local_kv(remote) and not is_local_kv(kv_pb2.KVHandle())


async def _picks() -> None:
    reg = Registry(0.5, 16)
    for name, free, running in (("a", 100, 5), ("b", 100, 1)):
        address = f"127.0.0.1:{1000 + ord(name)}"
        reg.heartbeat(_status(name, DECODE, address, kv_blocks_free=free, running=running))
        reg.heartbeat(_status(f"{name}-prefill", PREFILL, address))
    prefill, decode = reg.ready(PREFILL), reg.ready(DECODE)
    # colocated: the engine with the lighter decode batch prefills, and decodes (same address)
    chosen = pick_colocated(prefill, decode, max_imbalance=2048)
    assert chosen is not None and chosen.replica_id == "b-prefill"
    assert pick_same_replica(decode, chosen.address).replica_id == "b"  # type: ignore[union-attr]
    reg.get("b-prefill").outstanding_prompt_tokens = 5000  # type: ignore[union-attr]
    assert pick_colocated(prefill, decode, 2048).replica_id == "a-prefill"  # type: ignore[union-attr]
    # a plain prefill pool (no twin at the same address): not colocated
    reg.heartbeat(_status("p", PREFILL, "127.0.0.1:9"))
    assert pick_colocated(reg.ready(PREFILL), decode, 2048) is None
    await reg.close()


def test_colocated_picking_balances_on_the_decode_side() -> None:
    asyncio.run(_picks())


async def _local_prefill() -> None:
    cfg = dataclasses.replace(make_config(context_len=4096), block_size=16, local_prefill_max_tokens=32)
    long_prompt = list(range(1, 200))
    hashes = hash_blocks(long_prompt, 16)
    reg = Registry(0.5, 16)
    reg.heartbeat(_status("d", DECODE, "127.0.0.1:1", kv_blocks_free=100))
    decode = reg.ready(DECODE)
    assert pick_local_prefill(decode, long_prompt[:20], cfg) is decode[0]  # short: local
    assert pick_local_prefill(decode, long_prompt, cfg) is None  # long: the prefill pool
    reg.heartbeat(_status("d", DECODE, "127.0.0.1:1", kv_blocks_free=100, prefix_hashes=hashes[:10]))
    decode = reg.ready(DECODE)
    assert cached_tokens(decode[0], long_prompt, 16) == 160
    assert pick_local_prefill(decode, long_prompt, cfg) is None  # 39 uncached > 32
    assert pick_local_prefill(decode, long_prompt[:190], cfg) is decode[0]  # 30 uncached
    off = dataclasses.replace(cfg, local_prefill_max_tokens=0)
    assert pick_local_prefill(decode, [1, 2], off) is None
    await reg.close()


def test_conditional_disaggregation_counts_uncached_tokens() -> None:
    asyncio.run(_local_prefill())
