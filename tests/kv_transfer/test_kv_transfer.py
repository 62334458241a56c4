"""kv_transfer units: handle round trip and validation, re-sharding plans, payload layout, and the
in-process fake backend end to end (TP 2 -> 1, 1 -> 2, refusals, expiry, fault injection)."""

from __future__ import annotations

import asyncio
import dataclasses
import time

import pytest
import torch
from pdserve.v1 import kv_pb2

from kv_transfer.fake import FakePuller, FakeRegistry, FakeSource
from kv_transfer.faults import fail_next_pulls
from kv_transfer.handle import KVHandle, RankShard
from kv_transfer.interfaces import TransferError, TransferState
from kv_transfer.payload import StagingPool, make_landing, plan_segments, source_tensors
from kv_transfer.reshard import PullPlan, plan_pulls

torch.set_num_threads(1)
L, H, B, D = 2, 4, 4, 8  # layers, kv heads (total), block size, head dim


def make_kv(num_blocks: int, heads: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(num_blocks, L, 2, heads, B, D, generator=g)  # [N, L, 2, H, B, D]


def make_handle(shards: tuple[RankShard, ...], num_tokens: int = 10, **kw: object) -> KVHandle:
    base = KVHandle("r1", num_tokens, B, L, H, D, "float32", len(shards), shards, time.time() + 60)
    return dataclasses.replace(base, **kw)  # type: ignore[arg-type]


def test_handle_round_trip() -> None:
    h = make_handle((RankShard(0, "a:1", (3, 4, 9)), RankShard(1, "b:2", (0, 1, 2))))
    h.validate()
    wire = h.to_proto().SerializeToString()
    assert KVHandle.from_proto(kv_pb2.KVHandle.FromString(wire)) == h


@pytest.mark.parametrize(
    "change",
    [
        {"num_tokens": 13},  # 3 blocks hold at most 12 tokens
        {"num_tokens": 8},  # needs 2 blocks, shards have 3
        {"tp_size": 3},  # shards != tp_size
        {"num_kv_heads": 5},  # not divisible by tp 2
        {"dtype": "float64"},
        {"block_size": 0},
        {"request_id": ""},
        {"shards": (RankShard(1, "a:1", (1, 2, 3)), RankShard(0, "b:2", (1, 2, 3)))},
        {"shards": (RankShard(0, "a:1", (1, 1, 3)), RankShard(1, "b:2", (1, 2, 3)))},
        {"shards": (RankShard(0, "", (1, 2, 3)), RankShard(1, "b:2", (1, 2, 3)))},
    ],
)
def test_handle_validation(change: dict) -> None:
    h = make_handle((RankShard(0, "a:1", (1, 2, 3)), RankShard(1, "b:2", (4, 5, 6))))
    h.validate()
    with pytest.raises(TransferError):
        dataclasses.replace(h, **change).validate()


def test_plan_pulls() -> None:
    assert plan_pulls(1, 1, 0, 8) == [PullPlan(0, (0, 8), (0, 8))]
    assert plan_pulls(2, 1, 0, 8) == [PullPlan(0, (0, 4), (0, 4)), PullPlan(1, (0, 4), (4, 8))]
    assert plan_pulls(4, 1, 0, 8) == [PullPlan(r, (0, 2), (2 * r, 2 * r + 2)) for r in range(4)]
    assert plan_pulls(1, 2, 1, 8) == [PullPlan(0, (4, 8), (0, 4))]
    assert plan_pulls(2, 4, 3, 8) == [PullPlan(1, (2, 4), (0, 2))]
    assert plan_pulls(4, 2, 1, 8) == [PullPlan(2, (0, 2), (0, 2)), PullPlan(3, (0, 2), (2, 4))]
    with pytest.raises(TransferError):
        plan_pulls(3, 1, 0, 8)


def test_plan_pulls_replicated_heads() -> None:
    # 2 KV heads over 4 prefill ranks: ranks 0, 1 hold head 0, ranks 2, 3 head 1
    assert plan_pulls(4, 1, 0, 2) == [PullPlan(0, (0, 1), (0, 1)), PullPlan(2, (0, 1), (1, 2))]
    assert plan_pulls(4, 2, 0, 2) == [PullPlan(0, (0, 1), (0, 1))]
    assert plan_pulls(4, 2, 1, 2) == [PullPlan(3, (0, 1), (0, 1))]  # spread: not rank 2 again
    assert plan_pulls(4, 2, 1, 2, near=[2]) == [PullPlan(2, (0, 1), (0, 1))]  # its own host first
    assert plan_pulls(4, 1, 0, 2, near=[1, 3]) == [PullPlan(1, (0, 1), (0, 1)), PullPlan(3, (0, 1), (1, 2))]
    # decode replicates: 1 KV head, 2 prefill ranks hold it, 4 decode ranks each pull it once
    assert [plan_pulls(2, 4, r, 1) for r in range(4)] == [[PullPlan(r % 2, (0, 1), (0, 1))] for r in range(4)]
    assert plan_pulls(1, 4, 3, 2) == [PullPlan(0, (1, 2), (0, 1))]
    with pytest.raises(TransferError, match="prefill TP"):
        plan_pulls(4, 1, 0, 6)


@pytest.mark.parametrize("ptp,dtp,heads", [(4, 1, 2), (4, 2, 2), (2, 4, 1), (8, 2, 4), (1, 4, 2), (4, 4, 1)])
def test_plans_with_replicated_heads_give_each_rank_its_heads(ptp: int, dtp: int, heads: int) -> None:
    from engine.tp import kv_head_range

    for rank in range(dtp):
        got = []
        for p in plan_pulls(ptp, dtp, rank, heads):
            src = kv_head_range(heads, ptp, p.src_rank)
            assert p.src_heads[1] <= len(src)
            got += [src.start + h for h in range(*p.src_heads)]
            assert p.dst_heads[1] - p.dst_heads[0] == p.src_heads[1] - p.src_heads[0]
        assert got == list(kv_head_range(heads, dtp, rank))  # each head once, in order


@pytest.mark.parametrize("ptp,dtp", [(1, 1), (2, 1), (4, 1), (1, 2), (2, 4), (4, 2), (8, 1)])
def test_plans_cover_each_head_once(ptp: int, dtp: int) -> None:
    heads = 8
    seen = []
    for rank in range(dtp):
        for p in plan_pulls(ptp, dtp, rank, heads):
            width = p.src_heads[1] - p.src_heads[0]
            assert width == p.dst_heads[1] - p.dst_heads[0] > 0
            seen += [rank * heads // dtp + p.dst_heads[0] + i for i in range(width)]
            assert [p.src_rank * heads // ptp + p.src_heads[0] + i for i in range(width)] == seen[-width:]
    assert seen == list(range(heads))


def test_segments_and_landing_zero_copy() -> None:
    assert plan_segments([5, 6, 7, 1], [0, 1, 2, 3], True) == [3, 1]
    assert plan_segments([5, 6, 7], [0, 1, 2], False) == [3]
    assert plan_segments(list(range(0, 200, 2)), list(range(100)), True) == [100]  # too many runs
    kv = make_kv(8, H)
    pool = StagingPool()
    tensors, staged = source_tensors(kv, [5, 6, 7, 1], [3, 1], (0, H), pool)
    assert tensors[0].data_ptr() == kv[5].data_ptr() and not staged  # views, not copies
    dst = make_kv(8, H, seed=1)
    landing = make_landing(dst, [0, 1, 2, 6], [3, 1], (0, H), pool)
    assert landing.buffers[0].data_ptr() == dst[0].data_ptr() and not landing.staged
    for buf, t in zip(landing.buffers, tensors, strict=True):
        buf.copy_(t)
    landing.finish()
    assert torch.equal(dst[[0, 1, 2, 6]], kv[[5, 6, 7, 1]])


def test_landing_scatters_heads() -> None:
    kv = make_kv(8, H)
    pool = StagingPool()
    tensors, staged = source_tensors(kv, [7, 2], [2], (1, 3), pool)
    assert staged == tensors
    dst = torch.zeros(8, L, 2, 2 * H, B, D)
    landing = make_landing(dst, [4, 0], [2], (5, 7), pool)
    landing.buffers[0].copy_(tensors[0])
    pool.give(tensors[0])
    landing.finish()
    assert torch.equal(dst[[4, 0], :, :, 5:7], kv[[7, 2], :, :, 1:3])
    assert dst[:, :, :, :5].abs().sum() == 0 and dst[:, :, :, 7:].abs().sum() == 0
    again = pool.take((2, L, 2, 2, B, D), torch.float32, dst.device)  # a returned buffer is reused
    assert again.data_ptr() in {tensors[0].data_ptr(), landing.buffers[0].data_ptr()}


async def _sources(reg: FakeRegistry, tp: int, ids: tuple[int, ...]) -> tuple[list[FakeSource], KVHandle]:
    sources, shards = [], []
    for rank in range(tp):
        src = FakeSource(make_kv(16, H // tp, seed=rank), rank, tp, H, registry=reg)
        shards.append(RankShard(rank, await src.start("fake"), ids))
        src.lease("r1", ids, time.time() + 60)
        sources.append(src)
    return sources, make_handle(tuple(shards), num_tokens=len(ids) * B - 1)


@pytest.mark.parametrize("ptp,dtp", [(1, 1), (2, 1), (1, 2), (4, 2)])
def test_fake_pull_reshards(ptp: int, dtp: int) -> None:
    async def main() -> None:
        reg = FakeRegistry()
        ids = (3, 4, 9, 10, 11)
        sources, handle = await _sources(reg, ptp, ids)
        full = torch.cat([s.kv for s in sources], dim=3)  # [N, L, 2, H, B, D] as one rank
        dst_ids = [0, 1, 2, 7, 5]
        for rank in range(dtp):
            puller = FakePuller(torch.zeros(16, L, 2, H // dtp, B, D), rank, dtp, H, registry=reg)
            await puller.pull(handle, dst_ids, timeout=5)
            assert puller.state("r1") is TransferState.DONE
            heads = slice(rank * H // dtp, (rank + 1) * H // dtp)
            assert torch.equal(puller.kv[dst_ids], full[list(ids), :, :, heads])

    asyncio.run(main())


@pytest.mark.parametrize("ptp,dtp,heads", [(4, 2, 2), (4, 1, 2), (2, 4, 1), (1, 2, 1)])
def test_fake_pull_replicated_heads(ptp: int, dtp: int, heads: int) -> None:
    """Sources hold replicated heads (rank r: head r * heads // ptp); decode ranks get theirs."""
    from engine.tp import kv_head_range

    async def main() -> None:
        reg = FakeRegistry()
        ids = (3, 4, 9)
        full = make_kv(16, heads, seed=7)  # [N, L, 2, heads, B, D]: what every holder of a head has
        shards = []
        for rank in range(ptp):
            own = kv_head_range(heads, ptp, rank)
            src = FakeSource(full[:, :, :, own.start : own.stop].contiguous(), rank, ptp, heads, registry=reg)
            shards.append(RankShard(rank, await src.start("fake"), ids))
            src.lease("r1", ids, time.time() + 60)
        handle = dataclasses.replace(make_handle(tuple(shards), num_tokens=len(ids) * B), num_kv_heads=heads)
        for rank in range(dtp):
            want = kv_head_range(heads, dtp, rank)
            puller = FakePuller(torch.zeros(16, L, 2, len(want), B, D), rank, dtp, heads, registry=reg)
            await puller.pull(handle, [0, 5, 6], timeout=5)
            assert torch.equal(puller.kv[[0, 5, 6]], full[list(ids), :, :, want.start : want.stop])

    asyncio.run(main())


def test_fake_refusals() -> None:
    async def main() -> None:
        reg = FakeRegistry()
        (src,), handle = await _sources(reg, 1, (1, 2))
        puller = FakePuller(torch.zeros(16, L, 2, H, B, D), 0, 1, H, registry=reg)
        fail_next_pulls(src, 1)
        with pytest.raises(TransferError, match="injected"):
            await puller.pull(handle, [0, 1], timeout=5)
        assert puller.state("r1") is TransferState.FAILED
        await puller.pull(handle, [0, 1], timeout=5)  # the source keeps serving
        with pytest.raises(TransferError, match="no lease"):
            await puller.pull(dataclasses.replace(handle, request_id="other"), [0, 1], timeout=5)
        src.lease("r1", [1, 2], time.time() - 1)
        with pytest.raises(TransferError, match="expired"):
            await puller.pull(handle, [0, 1], timeout=5)
        assert src.leased_blocks() == 0

    asyncio.run(main())


def test_lease_token_is_required_when_the_lease_has_one() -> None:
    async def main() -> None:
        reg = FakeRegistry()
        (src,), handle = await _sources(reg, 1, (1, 2))
        src.lease("r1", [1, 2], time.time() + 60, token=b"secret-of-r1")
        puller = FakePuller(torch.zeros(16, L, 2, H, B, D), 0, 1, H, registry=reg)
        for wrong in (b"", b"secret-of-r2"):  # a request id alone, or another lease's secret
            with pytest.raises(TransferError, match="wrong lease token"):
                await puller.pull(dataclasses.replace(handle, lease_token=wrong), [0, 1], timeout=5)
        await puller.pull(dataclasses.replace(handle, lease_token=b"secret-of-r1"), [0, 1], timeout=5)
        assert torch.equal(puller.kv[[0, 1]], src.kv[[1, 2]])
        with pytest.raises(TransferError, match="lease_token"):
            dataclasses.replace(handle, lease_token=b"x" * 65).validate()

    asyncio.run(main())


def test_source_rejects_hostile_requests() -> None:
    src = FakeSource(make_kv(8, H), 0, 1, H, registry=FakeRegistry())
    src.lease("r", [1, 2, 3], time.time() + 60)
    bad = [
        kv_pb2.PullRequest(request_id="r", block_ids=[1, 4], head_start=0, head_end=H),  # foreign
        kv_pb2.PullRequest(request_id="r", block_ids=[1, 99], head_start=0, head_end=H),  # range
        kv_pb2.PullRequest(request_id="r", block_ids=[1], head_start=2, head_end=9),  # heads
        kv_pb2.PullRequest(request_id="r", block_ids=[1], head_start=2, head_end=2),
        kv_pb2.PullRequest(request_id="r", block_ids=[1, 2], head_end=H, segments=[1, 5]),
        kv_pb2.PullRequest(request_id="x", block_ids=[1], head_end=H),
        kv_pb2.PullRequest(request_id="r", head_end=H),
    ]
    for req in bad:
        assert not src.answer(req.SerializeToString()).response.ok, req
    assert not src.answer(b"\xff\xff\xff").response.ok
    assert not src.answer(b"\x00" * (2 << 20)).response.ok
    ok = src.answer(kv_pb2.PullRequest(request_id="r", block_ids=[3, 1], head_end=H).SerializeToString())
    assert ok.response.ok and ok.response.payload_bytes == 2 * L * 2 * H * B * D * 4
