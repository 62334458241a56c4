"""Same-host KV read over the UCX backend: a source whose pool is a memfd (engine.allocate_kv on
CPU) lets a puller on its host copy the blocks out of the mapped pool; the UCX connection carries
only the request, the answer and the end-of-copy check. Real UCX, a real second process."""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import os
import time
from typing import Any

import pytest
import torch

from engine.kv_cache import shareable_zeros, shared_pool
from kv_transfer.handle import KVHandle, RankShard
from kv_transfer.host import HOST_ID
from kv_transfer.interfaces import TransferError
from kv_transfer.ucx import UCXConfig, UCXPuller, UCXSource, copy_blocks

L, H, B, D, N = 2, 4, 4, 8, 32  # layers, kv heads, block size, head dim, blocks

pytestmark = pytest.mark.skipif(not HOST_ID, reason="needs Linux /proc")


def _filled(seed: int, heads: int = H) -> torch.Tensor:
    kv = shareable_zeros((N, L, 2, heads, B, D), torch.float32)
    kv.copy_(torch.randn(kv.shape, generator=torch.Generator().manual_seed(seed)))
    return kv


def _handle(rid: str, endpoint: str, ids: list[int], tp: int = 1, rank: int = 0) -> KVHandle:
    shard = RankShard(rank, endpoint, tuple(ids))
    return KVHandle(rid, len(ids) * B, B, L, H, D, "float32", tp, (shard,), time.time() + 60)


def _source_process(conn: Any) -> None:
    """A source in another process: serves a filled shareable pool, leases on command."""

    async def serve() -> None:
        source = UCXSource(_filled(5), 0, 1, H)
        conn.send(await source.start("127.0.0.1"))
        while True:
            if not conn.poll():
                await asyncio.sleep(0.005)
                continue
            cmd = conn.recv()
            if cmd[0] == "stop":
                await source.close()
                conn.send("ok")
                return
            source.lease(cmd[1], cmd[2], time.time() + 60)
            conn.send("ok")

    torch.set_num_threads(1)
    asyncio.run(serve())


def test_allocate_kv_is_a_memfd_other_processes_can_map() -> None:
    kv = _filled(1)
    pool = shared_pool(kv)
    assert pool is not None and os.fstat(pool.fd).st_size == kv.numel() * 4
    with open(f"/proc/{pool.pid}/fd/{pool.fd}", "rb") as f:
        f.seek(7 * kv[0].numel() * 4)
        head = torch.frombuffer(bytearray(f.read(16)), dtype=torch.float32)
    assert torch.equal(head, kv[7].reshape(-1)[:4])
    assert shared_pool(kv[1:]) is None  # only the tensor allocate_kv returned


def test_copy_blocks_runs_and_heads() -> None:
    src, dst = torch.randn(N, L, 2, H, B, D), torch.zeros(N, L, 2, 2, B, D)
    src_ids, dst_ids = [3, 4, 5, 9, 2], [10, 11, 12, 0, 1]
    copy_blocks(src, dst, src_ids, dst_ids, (2, 4), (0, 2))
    for s, d in zip(src_ids, dst_ids, strict=True):
        assert torch.equal(dst[d], src[s, :, :, 2:4])
    assert dst[[i for i in range(N) if i not in dst_ids]].abs().sum() == 0


def test_pull_from_another_process_reads_the_pool_and_matches() -> None:
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_source_process, args=(child,), daemon=True)
    proc.start()
    try:
        assert parent.poll(120), "source process did not start"
        endpoint = parent.recv()

        async def main() -> None:
            want = _filled(5)
            for ids, dst in (([4, 5, 6, 7], [0, 1, 2, 3]), ([9, 3, 20], [30, 31, 10])):
                rid = f"r{ids[0]}"
                parent.send(("lease", rid, ids))
                assert parent.poll(30) and parent.recv() == "ok"
                puller = UCXPuller(torch.zeros(N, L, 2, H, B, D), 0, 1, H)
                await puller.pull(_handle(rid, endpoint, ids), dst, timeout=30)
                assert endpoint in puller._pools  # the same-host read was taken
                assert torch.equal(puller.kv[dst], want[ids])
                await puller.close()
            # a puller that does not ask for it gets the payload over UCX, same bytes
            parent.send(("lease", "p", [1, 2]))
            assert parent.poll(30) and parent.recv() == "ok"
            puller = UCXPuller(torch.zeros(N, L, 2, H, B, D), 0, 1, H, UCXConfig(same_host_read=False))
            await puller.pull(_handle("p", endpoint, [1, 2]), [5, 6], timeout=30)
            assert not puller._pools and torch.equal(puller.kv[[5, 6]], want[[1, 2]])
            await puller.close()

        asyncio.run(main())
        parent.send(("stop",))
        assert parent.poll(30) and parent.recv() == "ok"
    finally:
        proc.join(10)
        if proc.is_alive():
            proc.kill()


def test_lease_ending_during_the_copy_fails_the_pull_and_a_heads_slice_reads_right(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Source and puller in this process (UCX loopback). The source drops the lease while the
    puller copies: the pull must fail, not report blocks that may have been reused meanwhile.
    A decode rank of TP 2 reads its half of the heads."""
    import kv_transfer.ucx as ucx

    async def main() -> None:
        source = UCXSource(_filled(9), 0, 1, H)
        endpoint = await source.start("127.0.0.1")
        try:
            source.lease("half", [1, 2, 3], time.time() + 60)
            puller = UCXPuller(torch.zeros(N, L, 2, H // 2, B, D), 1, 2, H)
            await puller.pull(_handle("half", endpoint, [1, 2, 3]), [7, 8, 9], timeout=30)
            assert torch.equal(puller.kv[[7, 8, 9]], source.kv[[1, 2, 3], :, :, 2:4])

            real = ucx.copy_blocks

            def copy_then_lose_lease(*args: Any) -> None:
                real(*args)
                source.unlease("lost")  # the router released it (client gone) mid-copy

            monkeypatch.setattr(ucx, "copy_blocks", copy_then_lose_lease)
            source.lease("lost", [4, 5], time.time() + 60)
            with pytest.raises(TransferError, match="lease of 'lost' ended"):
                await puller.pull(_handle("lost", endpoint, [4, 5]), [0, 1], timeout=30)
            await puller.close()
        finally:
            await source.close()

    asyncio.run(main())


def test_a_pool_that_cannot_be_mapped_falls_back_to_the_payload(monkeypatch: pytest.MonkeyPatch) -> None:
    """/proc/<pid>/fd of the source not openable (another user, another pid namespace): the
    puller tells the source, then takes the payload, and stops asking that source."""
    import kv_transfer.ucx as ucx

    async def unmappable(self: UCXPuller, endpoint: str, pool: Any) -> torch.Tensor:
        raise PermissionError(13, "Permission denied", f"/proc/{pool.pid}/fd/{pool.fd}")

    monkeypatch.setattr(ucx.UCXPuller, "_mapped_pool", unmappable)

    async def main() -> None:
        source = UCXSource(_filled(11), 0, 1, H)
        endpoint = await source.start("127.0.0.1")
        try:
            puller = UCXPuller(torch.zeros(N, L, 2, H, B, D), 0, 1, H)
            for rid, ids in (("a", [3, 4]), ("b", [6, 8])):
                source.lease(rid, ids, time.time() + 60)
                await puller.pull(_handle(rid, endpoint, ids), [0, 1], timeout=30)
                assert torch.equal(puller.kv[[0, 1]], source.kv[ids])
            assert puller._not_local == {endpoint}
            await puller.close()
        finally:
            await source.close()

    asyncio.run(main())
