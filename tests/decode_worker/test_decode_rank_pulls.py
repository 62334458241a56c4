"""RankPulls (decode_worker/rank.py) against real Ray actors: when rank 0's pull is cancelled or any
rank's pull fails, run() returns only after every follower's call has ended, so the caller may free
the blocks they were writing. The actors here stand in for DecodeRank's transport only: they sleep
where a pull would write and record how their call ended."""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

import pytest

from decode_worker.rank import RankPulls
from kv_transfer.handle import KVHandle, RankShard
from kv_transfer.interfaces import TransferError
from tests.fake_workers import SlowRank

if TYPE_CHECKING:
    from ray.actor import ActorHandle

pytestmark = pytest.mark.usefixtures("ray_session")


def _handle() -> KVHandle:
    return KVHandle("r", 8, 8, 1, 2, 4, "float32", 1, (RankShard(0, "h:1", (0,)),), time.time() + 60)


@pytest.fixture(scope="module")
def ranks() -> list[ActorHandle[SlowRank]]:
    import ray

    # Ray's stubs type an actor class's .remote() as `ActorHandle | type` (it is the handle)
    return [ray.remote(SlowRank).options(num_cpus=0).remote() for _ in range(2)]  # type: ignore[misc]


def _actors(ranks: list[ActorHandle[SlowRank]], *specs: tuple[float, bool]) -> list[ActorHandle[SlowRank]]:
    import ray

    ray.get([r.configure.remote(s, f) for r, (s, f) in zip(ranks, specs, strict=False)])
    return ranks[: len(specs)]


def test_cancelled_pull_waits_for_every_follower(ranks: list[ActorHandle[SlowRank]]) -> None:
    import ray

    followers = _actors(ranks, (30.0, False), (30.0, False))

    async def main() -> float:
        pulls = RankPulls(followers)
        task = asyncio.ensure_future(pulls.run(asyncio.sleep(30.0), _handle(), [0], 10.0, -1))
        await asyncio.sleep(0.5)
        task.cancel()
        start = time.monotonic()
        with pytest.raises(asyncio.CancelledError):
            await task
        return time.monotonic() - start

    took = asyncio.run(main())
    assert ray.get([f.how_ended.remote() for f in followers]) == ["cancelled", "cancelled"]
    assert 0.25 < took < 10.0  # waited for the followers' ends, not for their 30 s pulls


def test_failed_rank_cancels_the_others_and_raises_transfer_error(ranks: list[ActorHandle[SlowRank]]) -> None:
    import ray

    followers = _actors(ranks, (30.0, False), (0.0, True))

    async def main() -> None:
        with pytest.raises(TransferError, match="source refused"):
            await RankPulls(followers).run(asyncio.sleep(30.0), _handle(), [0], 10.0, -1)

    asyncio.run(main())
    assert ray.get(followers[0].how_ended.remote()) == "cancelled"


def test_all_ranks_succeed_returns_rank0_result(ranks: list[ActorHandle[SlowRank]]) -> None:
    import ray

    followers = _actors(ranks, (0.2, False))

    async def own() -> int:
        await asyncio.sleep(0.1)
        return 7

    assert asyncio.run(RankPulls(followers).run(own(), _handle(), [0], 10.0, 0)) == 7
    assert ray.get(followers[0].how_ended.remote()) == "done"
