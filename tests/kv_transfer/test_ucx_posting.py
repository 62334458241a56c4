"""How the UCX backend posts its messages: a pull's receives are all posted before its request goes
out (one round trip, nothing arrives unexpected), and a failed UCX request reaches its waiter as a
frameless error. Real UCX, source and puller in this process."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
import torch

from kv_transfer import ucx, ucx_loop
from kv_transfer.handle import KVHandle, RankShard
from kv_transfer.interfaces import TransferError
from kv_transfer.ucx import UCXConfig, UCXPuller, UCXSource

L, H, B, D, N = 2, 4, 4, 8, 16  # layers, kv heads, block size, head dim, blocks


def test_a_pull_posts_its_receives_before_its_request(monkeypatch: pytest.MonkeyPatch) -> None:
    posted: list[tuple[str, int | None]] = []  # ("recv" | "send", tag), in the order posted
    send, recv = ucx_loop.send, ucx_loop.recv

    def logged_send(ep: Any, buffer: Any, tag: int | None = None) -> asyncio.Future[None]:
        posted.append(("send", tag))
        return send(ep, buffer, tag)

    def logged_recv(ep: Any, buffer: Any, tag: int | None = None, idle: bool = False) -> asyncio.Future[None]:
        posted.append(("recv", tag))
        return recv(ep, buffer, tag, idle)

    monkeypatch.setattr(ucx_loop, "send", logged_send)
    monkeypatch.setattr(ucx_loop, "recv", logged_recv)
    src_ids, dst_ids = [3, 4, 9], [0, 1, 5]  # two joint runs: two zero-copy segments

    async def main() -> None:
        kv = torch.randn(N, L, 2, H, B, D)
        source = UCXSource(kv, 0, 1, H)
        endpoint = await source.start("127.0.0.1")
        puller = UCXPuller(torch.zeros(N, L, 2, H, B, D), 0, 1, H, UCXConfig(same_host_read=False))
        try:
            source.lease("r", src_ids, time.time() + 60)
            handle = KVHandle("r", len(src_ids) * B, B, L, H, D, "float32", 1,
                              (RankShard(0, endpoint, tuple(src_ids)),), time.time() + 60)
            await puller.pull(handle, dst_ids, timeout=30)
            assert torch.equal(puller.kv[dst_ids], kv[src_ids])
        finally:
            await puller.close()
            await source.close()

    asyncio.run(main())
    request = next(i for i, (kind, _) in enumerate(posted) if kind == "send")  # the puller's
    payload = [i for i, (kind, tag) in enumerate(posted) if kind == "recv" and tag is not None]
    assert len(payload) == 2 and max(payload) < request
    assert [tag for kind, tag in posted if kind == "send" and tag is not None] == [posted[i][1] for i in payload]


class _Unbuildable(Exception):
    def __init__(self, a: int, b: int) -> None:
        super().__init__(f"{a}/{b}")


def test_a_failed_request_reaches_its_waiter_without_frames() -> None:
    def fail(error: Exception) -> Exception:
        try:
            raise error
        except Exception as e:  # noqa: BLE001
            return e

    fresh = ucx_loop._fresh(fail(ucx.ucxx.exceptions.UCXCanceledError("cancelled")))
    assert type(fresh) is ucx.ucxx.exceptions.UCXCanceledError and fresh.args == ("cancelled",)
    assert fresh.__traceback__ is None
    odd = ucx_loop._fresh(fail(_Unbuildable(1, 2)))
    assert isinstance(odd, TransferError) and "_Unbuildable" in str(odd) and odd.__traceback__ is None
