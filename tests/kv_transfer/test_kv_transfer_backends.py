"""UCX and torch.distributed backends between real processes.

Sources run in spawned processes (process A: rank 0 of a TP-2 group and a TP-1 source, so two
sources share one process; process B: rank 1 of the TP-2 group); pullers run in the test process
(two pullers share it for decode TP 2). The harness Pipe that tells a source to lease is test
plumbing only; the transfer itself goes through the backend under test.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import time
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from pdserve.v1 import kv_pb2

from kv_transfer.faults import fail_next_pulls
from kv_transfer.handle import KVHandle, RankShard
from kv_transfer.interfaces import MAX_REQUEST_BYTES, TransferError, TransferState
from kv_transfer.puller import KVPuller
from kv_transfer.source import KVSource

L, H, B, D, N = 2, 4, 4, 8, 32  # layers, kv heads, block size, head dim, blocks
SEEDS = {"tp1": 20, "tp2r0": 10, "tp2r1": 11}
TP = {"tp1": (0, 1), "tp2r0": (0, 2), "tp2r1": (1, 2)}  # name -> (rank, tp)


def make_kv(name: str) -> torch.Tensor:
    rank, tp = TP[name]
    g = torch.Generator().manual_seed(SEEDS[name])
    return torch.randn(N, L, 2, H // tp, B, D, generator=g)  # [N, L, 2, H_rank, B, D]


def make_source(backend: str, kv: torch.Tensor, rank: int, tp: int) -> KVSource:
    if backend == "ucx":
        from kv_transfer.ucx import UCXSource

        return UCXSource(kv, rank, tp, H)
    from kv_transfer.torch_dist import TorchDistSource

    return TorchDistSource(kv, rank, tp, H)


def make_puller(backend: str, rank: int, tp: int) -> KVPuller:
    kv = torch.zeros(N, L, 2, H // tp, B, D)
    if backend == "ucx":
        from kv_transfer.ucx import UCXPuller

        return UCXPuller(kv, rank, tp, H)
    from kv_transfer.torch_dist import TorchDistPuller

    return TorchDistPuller(kv, rank, tp, H)


def source_main(backend: str, names: list[str], conn: Any) -> None:
    torch.set_num_threads(1)
    asyncio.run(_source_loop(backend, names, conn))


async def _source_loop(backend: str, names: list[str], conn: Any) -> None:
    sources = {n: make_source(backend, make_kv(n), *TP[n]) for n in names}
    conn.send({n: await s.start("127.0.0.1") for n, s in sources.items()})
    while True:
        if not conn.poll():
            await asyncio.sleep(0.005)
            continue
        cmd, name, *args = conn.recv()
        if cmd == "stop":
            for s in sources.values():
                await s.close()
            conn.send("ok")
            return
        src = sources[name]
        if cmd == "lease":
            src.lease(args[0], args[1], time.time() + args[2])
        elif cmd == "fail":
            fail_next_pulls(src, args[0])
        conn.send(src.leased_blocks())


class Cluster:
    """Source processes for one backend, and the harness pipe to each."""

    def __init__(self, backend: str, layout: list[list[str]]) -> None:
        ctx = mp.get_context("spawn")
        self.backend, self.procs, self.conns, self.endpoints = backend, [], {}, {}
        for names in layout:
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=source_main, args=(backend, names, child), daemon=True)
            proc.start()
            self.procs.append(proc)
            for n in names:
                self.conns[n] = parent
        for parent in {id(c): c for c in self.conns.values()}.values():
            assert parent.poll(120), "source process did not start"
            self.endpoints.update(parent.recv())

    def call(self, *cmd: Any) -> Any:
        conn = self.conns[cmd[1]]
        conn.send(cmd)
        assert conn.poll(30)
        return conn.recv()

    def lease(self, names: list[str], rid: str, ids: list[int], ttl: float = 60) -> KVHandle:
        for n in names:
            self.call("lease", n, rid, ids, ttl)
        shards = tuple(RankShard(TP[n][0], self.endpoints[n], tuple(ids)) for n in names)
        return KVHandle(rid, len(ids) * B, B, L, H, D, "float32", len(names), shards, time.time() + ttl)

    def close(self) -> None:
        for parent in {id(c): c for c in self.conns.values()}.values():
            parent.send(("stop", None))
        for proc in self.procs:
            proc.join(10)
            if proc.is_alive():
                proc.kill()


@pytest.fixture(scope="module", params=["ucx", "torch_dist"])
def cluster(request: pytest.FixtureRequest) -> Iterator[Cluster]:
    c = Cluster(request.param, [["tp2r0", "tp1"], ["tp2r1"]])
    yield c
    c.close()


def full_kv(names: list[str]) -> torch.Tensor:
    return torch.cat([make_kv(n) for n in names], dim=3)  # [N, L, 2, H, B, D]


def test_pull_tp1_to_1(cluster: Cluster) -> None:
    async def main() -> None:
        puller = make_puller(cluster.backend, 0, 1)
        src_ids, dst_ids = [3, 4, 5, 9], [10, 11, 12, 0]
        handle = cluster.lease(["tp1"], "a", src_ids)
        await puller.pull(handle, dst_ids, timeout=30)
        assert puller.state("a") is TransferState.DONE
        assert torch.equal(puller.kv[dst_ids], make_kv("tp1")[src_ids])
        handle = cluster.lease(["tp1"], "a2", [7, 1, 30])  # reuses the cached connection
        await puller.pull(handle, [2, 3, 4], timeout=30)
        assert torch.equal(puller.kv[[2, 3, 4]], make_kv("tp1")[[7, 1, 30]])
        assert puller.kv[20:].abs().sum() == 0  # nothing written outside the destination
        await puller.close()

    asyncio.run(main())


def test_pull_tp2_to_1(cluster: Cluster) -> None:
    async def main() -> None:
        puller = make_puller(cluster.backend, 0, 1)
        src_ids, dst_ids = [8, 9, 10, 11, 2], [1, 2, 3, 4, 6]
        handle = cluster.lease(["tp2r0", "tp2r1"], "b", src_ids)
        await puller.pull(handle, dst_ids, timeout=30)
        assert torch.equal(puller.kv[dst_ids], full_kv(["tp2r0", "tp2r1"])[src_ids])
        h1 = cluster.lease(["tp2r0", "tp2r1"], "b1", [20, 21])  # two requests at once
        h2 = cluster.lease(["tp2r0", "tp2r1"], "b2", [25, 3, 4])
        await asyncio.gather(puller.pull(h1, [10, 11], timeout=30), puller.pull(h2, [12, 14, 13], timeout=30))
        want = full_kv(["tp2r0", "tp2r1"])
        assert torch.equal(puller.kv[[10, 11, 12, 14, 13]], want[[20, 21, 25, 3, 4]])
        await puller.close()

    asyncio.run(main())


def test_pull_tp1_to_2(cluster: Cluster) -> None:
    async def main() -> None:
        pullers = [make_puller(cluster.backend, r, 2) for r in range(2)]
        src_ids, dst_ids = [5, 6, 7], [0, 1, 2]
        handle = cluster.lease(["tp1"], "c", src_ids)
        await asyncio.gather(*(p.pull(handle, dst_ids, timeout=30) for p in pullers))
        want = make_kv("tp1")[src_ids]
        for r, p in enumerate(pullers):
            assert torch.equal(p.kv[dst_ids], want[:, :, :, 2 * r : 2 * r + 2])
            await p.close()

    asyncio.run(main())


async def _raw_ucx_exchange(endpoint: str, data: bytes, claimed: int | None) -> Any:
    """raw_exchange over UCX; runs on the process's UCX loop (ucxx's futures live there)."""
    import numpy as np
    import ucxx

    from kv_transfer.ucx import recv_message, send_message

    host, _, port = endpoint.rpartition(":")
    ep = await ucxx.create_endpoint(host, int(port))
    try:
        if claimed is None:
            await send_message(ep, data)
        else:
            await ep.send(np.array([claimed], dtype="<u8"))
        reply = await asyncio.wait_for(recv_message(ep, MAX_REQUEST_BYTES), 10)
    finally:
        ep.abort()
    return kv_pb2.PullResponse.FromString(reply or b"")


async def raw_exchange(backend: str, endpoint: str, data: bytes, claimed: int | None = None) -> Any:
    """Sends one raw request (or only a length header claiming `claimed` bytes)."""
    deadline = time.monotonic() + 10
    if backend == "ucx":
        from kv_transfer.ucx_loop import on_ucx_loop

        return await on_ucx_loop(_raw_ucx_exchange(endpoint, data, claimed))
    from kv_transfer.torch_dist import TorchDistPuller

    puller = make_puller(backend, 0, 1)
    assert isinstance(puller, TorchDistPuller)
    link = await asyncio.to_thread(puller.link, endpoint, deadline)
    if claimed is None:
        return await asyncio.to_thread(puller.exchange, link, data, deadline)
    link.pair.requests += 1
    link.store.set(f"ring/{link.key}/{link.pair.requests}", "go")
    link.pair.send_len(claimed, 10)
    reply = await asyncio.to_thread(link.pair.recv_bytes, MAX_REQUEST_BYTES, 10)
    return kv_pb2.PullResponse.FromString(reply or b"")


def test_hostile_requests_rejected(cluster: Cluster) -> None:
    async def main() -> None:
        cluster.lease(["tp1"], "d", [1, 2, 3])
        ep = cluster.endpoints["tp1"]
        bad = [
            b"\xff\xfe garbage",
            kv_pb2.PullRequest(request_id="nope", block_ids=[1], head_end=H).SerializeToString(),
            kv_pb2.PullRequest(request_id="d", block_ids=[1, 7], head_end=H).SerializeToString(),
            kv_pb2.PullRequest(request_id="d", block_ids=[1, 9999], head_end=H).SerializeToString(),
            kv_pb2.PullRequest(request_id="d", block_ids=[1], head_start=3, head_end=99).SerializeToString(),
        ]
        if cluster.backend == "ucx":  # a malformed worker address must not reach UCX's asserts
            for address in (b"\xff\xfe garbage", b"\x20" + b"\xff" * 200):
                req = kv_pb2.PullRequest(request_id="d", block_ids=[1], head_end=H, reply_address=address)
                bad.append(req.SerializeToString())
        for data in bad:
            response = await raw_exchange(cluster.backend, ep, data)
            assert not response.ok and response.error, data
        response = await raw_exchange(cluster.backend, ep, b"", claimed=MAX_REQUEST_BYTES + 1)
        assert not response.ok and "too large" in response.error
        puller = make_puller(cluster.backend, 0, 1)  # the source still serves
        await puller.pull(cluster.lease(["tp1"], "d", [1, 2, 3]), [4, 5, 6], timeout=30)
        assert torch.equal(puller.kv[[4, 5, 6]], make_kv("tp1")[[1, 2, 3]])
        await puller.close()

    asyncio.run(main())


def test_injected_failure_and_expired_lease(cluster: Cluster) -> None:
    async def main() -> None:
        puller = make_puller(cluster.backend, 0, 1)
        handle = cluster.lease(["tp1"], "e", [11, 12])
        cluster.call("fail", "tp1", 1)
        with pytest.raises(TransferError, match="injected"):
            await puller.pull(handle, [0, 1], timeout=30)
        assert puller.state("e") is TransferState.FAILED
        await puller.pull(handle, [0, 1], timeout=30)
        assert puller.state("e") is TransferState.DONE
        handle = cluster.lease(["tp1"], "f", [13], ttl=0.3)
        await asyncio.sleep(0.5)
        with pytest.raises(TransferError, match="expired"):
            await puller.pull(handle, [2], timeout=30)
        await puller.close()

    asyncio.run(main())


@pytest.mark.parametrize("backend", ["ucx", "torch_dist"])
def test_dead_source_fails_within_timeout(backend: str) -> None:
    async def main() -> None:
        c = Cluster(backend, [["tp1"]])
        puller = make_puller(backend, 0, 1)
        handle = c.lease(["tp1"], "g", [1, 2])
        await puller.pull(handle, [3, 4], timeout=30)  # cache a live connection
        c.procs[0].kill()
        c.procs[0].join(10)
        for _ in range(2):  # the cached connection, then a fresh connect attempt
            t0 = time.monotonic()
            with pytest.raises(TransferError):
                await puller.pull(handle, [3, 4], timeout=3)
            assert time.monotonic() - t0 < 10  # timeout 3 s, plus slack for a loaded machine
        await puller.close()

    asyncio.run(main())


def test_ucx_connections_failed_or_given_up_leave_no_endpoint_behind() -> None:
    """A pull to a port that accepts TCP but never speaks UCX: once when the connect times out, once
    when the pull is cancelled while connecting. Afterwards no UCX endpoint may be left alive (an
    endpoint left to the garbage collector is finalized on whatever thread runs it, which once
    crashed the test process), and even the kept TransferError holds none."""
    import gc
    import socket

    import ucxx._lib.libucxx as ucx_api

    from kv_transfer.ucx import UCXConfig, UCXPuller

    def live_endpoints() -> int:
        return sum(type(o) is ucx_api.UCXEndpoint for o in gc.get_objects())

    async def main() -> None:
        with socket.socket() as silent:
            silent.bind(("127.0.0.1", 0))
            silent.listen(8)
            handle = KVHandle("s", 2 * B, B, L, H, D, "float32", 1,
                              (RankShard(0, f"127.0.0.1:{silent.getsockname()[1]}", (1, 2)),), time.time() + 60)
            puller = UCXPuller(torch.zeros(N, L, 2, H, B, D), 0, 1, H, UCXConfig(connect_timeout=0.5))
            with pytest.raises(TransferError, match="cannot connect") as failed:
                await puller.pull(handle, [3, 4], timeout=10)
            cancelled = asyncio.ensure_future(puller.pull(handle, [3, 4], timeout=10))
            await asyncio.sleep(0.2)
            assert live_endpoints() == 1  # the connection being made
            cancelled.cancel()
            with pytest.raises(asyncio.CancelledError):
                await cancelled
            await puller.close()  # waits for the abandoned connection to end
            assert failed.value is not None
            assert live_endpoints() == 0

    asyncio.run(main())


def puller_then_die(backend: str, handle_wire: bytes) -> None:
    """Child process: pulls once (so the source holds a connection to it), then dies abruptly."""
    import os

    handle = KVHandle.from_proto(kv_pb2.KVHandle.FromString(handle_wire))

    async def main() -> None:
        puller = make_puller(backend, 0, 1)
        await puller.pull(handle, list(range(handle.num_blocks)), timeout=30)
        os._exit(0)

    asyncio.run(main())


def test_dead_puller_leaves_source_serving(cluster: Cluster) -> None:
    handle = cluster.lease(["tp1"], "h", [6, 7, 8])
    proc = mp.get_context("spawn").Process(
        target=puller_then_die, args=(cluster.backend, handle.to_proto().SerializeToString())
    )
    proc.start()
    proc.join(60)
    assert proc.exitcode == 0

    async def main() -> None:
        puller = make_puller(cluster.backend, 0, 1)
        await puller.pull(cluster.lease(["tp1"], "h2", [9, 10]), [0, 1], timeout=30)
        assert torch.equal(puller.kv[[0, 1]], make_kv("tp1")[[9, 10]])
        await puller.close()

    asyncio.run(main())
    assert all(p.is_alive() for p in cluster.procs)
