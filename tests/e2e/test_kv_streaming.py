"""Chunk-wise KV streaming (kv_transfer.streaming): a source answers a chunk's pull once it is
computed; end to end, greedy output equals transformers' and cancels free every block."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from kv_transfer.handle import KVHandle, RankShard
from kv_transfer.interfaces import TransferError
from tests.e2e import RunningCluster, cancel_mid_stream, running_cluster, small_config, wait_free
from tests.e2e.test_e2e_serving import NEW_TOKENS, _generate_all, _hf_tokens, _prompts

torch.set_num_threads(1)
L, H, B, D = 2, 4, 4, 8  # layers, kv heads, block size, head dim


def _handle(endpoint: str, num_tokens: int) -> KVHandle:
    shard = RankShard(0, endpoint, ())
    return KVHandle("s1", num_tokens, B, L, H, D, "float32", 1, (shard,), time.time() + 60)


async def _ucx_chunks(same_host_read: bool) -> None:
    from engine.kv_cache import shareable_zeros
    from kv_transfer.ucx import UCXConfig, UCXPuller, UCXSource

    src_kv = shareable_zeros((16, L, 2, H, B, D), torch.float32)  # [N, L, 2, H, B, D], as the engine's
    src_kv.copy_(torch.randn(src_kv.shape))
    dst_kv = torch.zeros_like(src_kv)
    source = UCXSource(src_kv, 0, 1, H)
    puller = UCXPuller(dst_kv, 0, 1, H, UCXConfig(same_host_read=same_host_read))
    handle = _handle(await source.start("127.0.0.1"), num_tokens=10)  # 3 blocks, the last partial
    src, dst = [5, 9, 2], [1, 2, 7]
    expiry = time.time() + 60
    try:
        source.stream_lease("s1", src[:2], 0, expiry)
        first = asyncio.ensure_future(puller.pull_chunk(handle, 0, dst[:2], 5.0))
        await asyncio.sleep(0.2)
        assert not first.done()  # not computed yet: the source waits
        source.stream_lease("s1", src, 2, expiry)
        assert await asyncio.wait_for(first, 5.0) is None
        assert torch.equal(dst_kv[dst[:2]], src_kv[src[:2]])
        last = asyncio.ensure_future(puller.pull_chunk(handle, 2, dst[2:], 5.0))
        await asyncio.sleep(0.2)
        assert not last.done()  # the partial last block waits for the end of the prefill
        source.stream_lease("s1", src, 3, expiry, first_token=42)
        assert await asyncio.wait_for(last, 5.0) == 42
        assert torch.equal(dst_kv[dst], src_kv[src])
        assert bool(puller._pools) == same_host_read  # which path the chunks took
        source.stream_lease("s2", [3], 0, expiry)
        gone = asyncio.ensure_future(puller.pull_chunk(dataclasses.replace(handle, request_id="s2", num_tokens=4),
                                                       0, [3], 5.0))
        await asyncio.sleep(0.2)
        source.unlease("s2")  # released (cancel, expiry) while decode waits: refused at once
        with pytest.raises(TransferError, match="no streamed lease"):
            await asyncio.wait_for(gone, 2.0)
    finally:
        await puller.close()
        await source.close()


@pytest.mark.parametrize("same_host_read", [True, False], ids=["same-host-read", "payload"])
def test_ucx_source_answers_each_chunk_once_computed(same_host_read: bool) -> None:
    asyncio.run(_ucx_chunks(same_host_read))


@pytest.fixture(scope="module")
def streaming(hf_checkpoint: Callable[[str], Path], ray_session: None) -> Iterator[RunningCluster]:
    path = hf_checkpoint("llama")
    cfg = small_config(str(path), prefill={"max_num_batched_tokens": 16},
                       kv_transfer={"streaming": True, "lease_seconds": 5})
    with running_cluster(cfg) as cl:
        yield cl


def test_streaming_tp2_matches_transformers(streaming: RunningCluster,
                                            hf_checkpoint: Callable[[str], Path]) -> None:
    prompts = _prompts() + [list(range(5, 53))]  # up to 50 tokens: 4 chunks of 2 blocks; 48: block-aligned
    expected = [tuple(t) for t in _hf_tokens(hf_checkpoint("llama"), prompts)]
    assert _generate_all(streaming.address, prompts) == expected
    assert len(expected[-1]) == NEW_TOKENS or expected[-1]
    wait_free(streaming.address, within=2.0)


def test_streaming_cancel_frees_every_block(streaming: RunningCluster) -> None:
    cancel_mid_stream(streaming.address, _prompts()[7])
    assert wait_free(streaming.address, within=2.0) <= 2.0
