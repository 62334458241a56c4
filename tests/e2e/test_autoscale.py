"""Each pool scales on its own signal on a real cluster (router + Serve pools + UCX), no request fails.

A burst of long generations raises decode 1 -> 2 while prefill stays at 1; a burst of long prompts
does the reverse; after each burst a trickle of small requests keeps flowing while the pool drains
back to its minimum. Every request of the run must succeed, and `pdserve status` must show the four
decisions with their reasons.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from router.client import generate, get_status
from tests.e2e import RunningCluster, running_cluster, small_config

pytestmark = pytest.mark.usefixtures("ray_session")

SCALE_UP_WITHIN = 120.0
SCALE_DOWN_WITHIN = 60.0
HEARTBEAT = 1.0  # also the metrics push period; 3 missed beats forget a replica, so not too short


def _prompt(n: int, seed: int) -> list[int]:
    return torch.randint(1, 1000, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@dataclass
class Load:
    """`threads` clients sending requests back to back until stop(); every error is kept."""

    address: str
    prompt_len: int
    max_tokens: int
    threads: int
    done: int = 0
    errors: list[BaseException] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _workers: list[threading.Thread] = field(default_factory=list)

    def start(self) -> Load:
        for i in range(self.threads):
            t = threading.Thread(target=self._run, args=(i,), daemon=True)
            t.start()
            self._workers.append(t)
        return self

    def _run(self, i: int) -> None:
        n = 0
        while not self._stop.is_set():
            n += 1
            try:
                out = generate(self.address, _prompt(self.prompt_len, 1000 * i + n),
                               max_tokens=self.max_tokens, ignore_eos=True, timeout=120)
                assert len(out.token_ids) == self.max_tokens
                self.done += 1
            except BaseException as exc:  # noqa: BLE001 - every failure counts
                self.errors.append(exc)

    def stop(self) -> None:
        self._stop.set()
        for t in self._workers:
            t.join(180)


def _replicas(address: str) -> tuple[int, int]:
    st = get_status(address)
    count = lambda pool: sum(1 for r in pool.replicas if r.ready and not r.draining)  # noqa: E731
    return count(st.prefill), count(st.decode)


def _wait_for(address: str, want: tuple[int, int], within: float,
              seen: list[tuple[int, int]]) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        now = _replicas(address)
        seen.append(now)
        if now == want:
            return
        time.sleep(0.25)
    raise AssertionError(f"(prefill, decode) replicas never reached {want} in {within}s; "
                         f"last {seen[-5:]}; status: {get_status(address)}")


@pytest.fixture(scope="module")
def scaling_cluster(hf_checkpoint: Callable[[str], Path]) -> Iterator[RunningCluster]:
    fast = {"min_replicas": 1, "max_replicas": 2, "upscale_delay_s": 1.0, "downscale_delay_s": 3.0}
    cfg = small_config(
        str(hf_checkpoint("llama")),
        router={"heartbeat_seconds": HEARTBEAT},
        prefill={"tensor_parallel_size": 1, "max_num_batched_tokens": 32,
                 "autoscaling": {**fast, "target": 500}},
        decode={"num_kv_blocks": 128, "max_num_seqs": 4, "autoscaling": {**fast, "target": 0.5}},
    )
    with running_cluster(cfg) as cl:
        yield cl


def test_each_pool_scales_on_its_own_signal_without_failed_requests(
        scaling_cluster: RunningCluster) -> None:
    address, seen = scaling_cluster.address, list[tuple[int, int]]()
    assert _replicas(address) == (1, 1)

    long_generations = Load(address, prompt_len=8, max_tokens=120, threads=6).start()
    try:
        _wait_for(address, (1, 2), SCALE_UP_WITHIN, seen)
    finally:
        long_generations.stop()
    trickle = Load(address, prompt_len=8, max_tokens=8, threads=1).start()
    try:
        _wait_for(address, (1, 1), SCALE_DOWN_WITHIN, seen)
    finally:
        trickle.stop()
    assert max(p for p, _ in seen) == 1, "prefill scaled during the decode burst"

    seen_prefill: list[tuple[int, int]] = []
    long_prompts = Load(address, prompt_len=400, max_tokens=1, threads=6).start()
    try:
        _wait_for(address, (2, 1), SCALE_UP_WITHIN, seen_prefill)
    finally:
        long_prompts.stop()
    trickle = Load(address, prompt_len=8, max_tokens=2, threads=1).start()
    try:
        _wait_for(address, (1, 1), SCALE_DOWN_WITHIN, seen_prefill)
    finally:
        trickle.stop()
    assert max(d for _, d in seen_prefill) == 1, "decode scaled during the prefill burst"

    loads = (long_generations, long_prompts)
    errors = [e for load in loads for e in load.errors] + trickle.errors
    assert not errors, f"{len(errors)} requests failed: {errors[:3]}"
    assert all(load.done > 0 for load in loads)
    _assert_decisions(address)


def _assert_decisions(address: str) -> None:
    wanted = {("decode", 1, 2), ("decode", 2, 1), ("prefill", 1, 2), ("prefill", 2, 1)}
    deadline = time.monotonic() + 10.0  # a policy reports a change on its next tick
    while True:
        moves = [(d.pool, d.from_replicas, d.to_replicas, d.reason) for d in get_status(address).scaling_decisions]
        missing = wanted - {(pool, a, b) for pool, a, b, _ in moves}
        if not missing or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert not missing, f"missing decisions {missing}: {moves}"
    ups = {pool: reason for pool, a, b, reason in moves if b > a}
    assert "KV/sequence use" in ups["decode"] and "queued prompt tokens" in ups["prefill"], ups
