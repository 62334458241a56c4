"""Soak: 5,000 requests against a local cluster (router + Ray Serve pools + UCX) with random
cancellations, short deadlines and injected KV-transfer failures.

Every request must end with a defined status (OK, CANCELLED, DEADLINE_EXCEEDED, UNAVAILABLE for an
injected transfer failure, RESOURCE_EXHAUSTED from admission), none may hang, no KV block may be
left allocated or leased afterwards, and each worker's RSS is reported before and after (and must
stay within bounds). `PDSERVE_SOAK_REQUESTS` changes the count; `PDSERVE_SOAK_REPORT` names a JSON
file for the figures. Slow: run with `pytest -m slow`.
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import random
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from pdserve.v1 import router_pb2_grpc

from router.client import build_request, get_status
from tests.e2e import RunningCluster, running_cluster, small_config
from tests.e2e.test_reliability_e2e import pid_listening_on

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_session")]

REQUESTS = int(os.environ.get("PDSERVE_SOAK_REQUESTS", "5000"))
CONCURRENCY = 48
HANG_SECONDS = 60.0  # a request not over after this long counts as hung
FAIL_EVERY = 250     # inject one transfer failure per this many requests
DEFINED = {grpc.StatusCode.OK, grpc.StatusCode.CANCELLED, grpc.StatusCode.DEADLINE_EXCEEDED,
           grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED}


@pytest.fixture(scope="module")
def cluster(hf_checkpoint: Callable[[str], Path]) -> Iterator[RunningCluster]:
    cfg = small_config(str(hf_checkpoint("llama")),
                       router={"max_inflight": 64},
                       prefill={"tensor_parallel_size": 1, "num_kv_blocks": 512},
                       decode={"num_kv_blocks": 512},
                       kv_transfer={"lease_seconds": 5, "timeout_seconds": 5})
    with running_cluster(cfg) as cl:
        yield cl


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _worker_pids(cluster: RunningCluster) -> dict[str, int]:
    """Replica id -> pid of the process serving its gRPC address (each replica is one process here)."""
    return {r.replica_id: pid_listening_on(r.address) for r in cluster.cluster.router.registry.replicas.values()}


async def _one(stub: router_pb2_grpc.RouterStub, rng: random.Random, i: int) -> tuple[str, float]:
    prompt = [rng.randint(1, 999) for _ in range(rng.randint(2, 24))]
    request = build_request(prompt, max_tokens=rng.randint(1, 6), ignore_eos=True, request_id=f"s{i}")
    mode = rng.random()
    timeout = rng.uniform(0.01, 0.3) if mode < 0.15 else 30.0
    start = time.monotonic()
    call = stub.Generate(request, timeout=timeout)

    async def consume() -> str:
        async for _ in call:
            pass
        return "OK"

    try:
        if mode > 0.85:  # cancel at a random moment
            task = asyncio.ensure_future(consume())
            await asyncio.sleep(rng.uniform(0, 0.05))
            call.cancel()
            await asyncio.wait_for(task, HANG_SECONDS)
            return "OK", time.monotonic() - start
        return await asyncio.wait_for(consume(), HANG_SECONDS), time.monotonic() - start
    except asyncio.CancelledError:
        return "CANCELLED", time.monotonic() - start
    except grpc.aio.AioRpcError as e:
        return e.code().name, time.monotonic() - start
    except TimeoutError:
        return "HUNG", time.monotonic() - start


async def _soak(address: str, inject: Callable[[], None]) -> collections.Counter[str]:
    rng = random.Random(1234)
    outcomes: collections.Counter[str] = collections.Counter()
    sem = asyncio.Semaphore(CONCURRENCY)
    async with grpc.aio.insecure_channel(address) as channel:
        stub = router_pb2_grpc.RouterStub(channel)

        async def run(i: int) -> None:
            async with sem:
                if i % FAIL_EVERY == FAIL_EVERY // 2:
                    await asyncio.to_thread(inject)
                code, _ = await _one(stub, rng, i)
                outcomes[code] += 1

        await asyncio.gather(*(run(i) for i in range(REQUESTS)))
    return outcomes


def _wait_all_free(address: str, within: float) -> dict[str, Any]:
    deadline = time.monotonic() + within
    while True:
        st = get_status(address)
        replicas = list(st.prefill.replicas) + list(st.decode.replicas)
        if all(r.kv_blocks_free == r.kv_blocks_total and r.kv_blocks_leased == 0 for r in replicas):
            time.sleep(0.6)  # two heartbeats: not a stale report
            st = get_status(address)
            replicas = list(st.prefill.replicas) + list(st.decode.replicas)
            if all(r.kv_blocks_free == r.kv_blocks_total and r.kv_blocks_leased == 0 for r in replicas):
                return {r.replica_id: (r.kv_blocks_free, r.kv_blocks_total) for r in replicas}
        assert time.monotonic() < deadline, f"leaked blocks: {st}"
        time.sleep(0.1)


def test_soak_every_request_ends_defined_no_leak_no_hang(cluster: RunningCluster) -> None:
    from ray import serve

    from deploy.serve_app import PREFILL_APP

    prefill = serve.get_app_handle(PREFILL_APP)

    def inject() -> None:
        prefill.fail_next_pulls.remote(1).result()

    asyncio.run(_warm(cluster.address))
    pids = _worker_pids(cluster)
    before = {name: _rss_mib(pid) for name, pid in pids.items()}
    start = time.monotonic()
    outcomes = asyncio.run(_soak(cluster.address, inject))
    elapsed = time.monotonic() - start
    try:
        free: Any = _wait_all_free(cluster.address, within=15.0)
    except AssertionError as e:
        free = f"{e}\nprefill engine still holds: {prefill.held_requests.remote().result()}"
    after = {name: _rss_mib(pid) for name, pid in pids.items()}
    report = {"requests": REQUESTS, "seconds": round(elapsed, 1), "outcomes": dict(outcomes),
              "rss_mib_before": before, "rss_mib_after": after, "blocks_free": free}
    print("\nSOAK", json.dumps(report, indent=1))
    if os.environ.get("PDSERVE_SOAK_REPORT"):
        Path(os.environ["PDSERVE_SOAK_REPORT"]).write_text(json.dumps(report, indent=1))
    assert isinstance(free, dict), free
    assert sum(outcomes.values()) == REQUESTS
    assert set(outcomes) <= {c.name for c in DEFINED}, outcomes  # no HUNG, INTERNAL, UNKNOWN
    assert outcomes["OK"] > REQUESTS // 2 and outcomes["UNAVAILABLE"] >= 1
    for name in before:
        assert after[name] < before[name] * 1.5 + 100, f"{name}: RSS {before[name]:.0f} -> {after[name]:.0f} MiB"


async def _warm(address: str) -> None:
    """A few hundred plain requests first, so allocator warm-up is not counted as growth."""
    async with grpc.aio.insecure_channel(address) as channel:
        stub = router_pb2_grpc.RouterStub(channel)

        async def one(i: int) -> None:
            async for _ in stub.Generate(build_request([1 + i % 900, 2, 3], max_tokens=4), timeout=60):
                pass

        for k in range(0, 200, 40):
            await asyncio.gather(*(one(k + i) for i in range(40)))
