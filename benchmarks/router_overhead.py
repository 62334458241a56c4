"""Router overhead (issue 6): TTFT at the client through the router minus the TTFT inside the prefill
replica, p50 at 16 concurrent requests (goal: under 1 ms).

    python benchmarks/router_overhead.py [--concurrency 16] [--rounds 8] [--prompt-len 64] [--out DIR]

The cluster (router + Ray Serve prefill TP=1 / decode replicas, engine.make_model tiny) runs in this
process; the client runs in a child process (grpc.aio, one asyncio thread) so it does not share the
router's interpreter. Every request has its own id; the replica reports, in
`PrefillResponse.prefill_seconds`, the time from its Prefill call arriving to the first token being
ready, and this script reads it per request id from the router's prefill stubs (a recording wrapper
around each registered replica's stub: the router's code is not changed). Overhead of a request =
client TTFT - prefill_seconds: the client -> router hop, validation, admission, picking, the router ->
prefill hop both ways and the first token's write back to the client. `--rounds` waves of
`--concurrency` requests sent at once; p50 / p90 / p99 over all. Writes router_overhead_c<N>.json and .png.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kv_streaming import new_axes, running, save  # noqa: E402

from deploy.config import DeployConfig, parse_config  # noqa: E402


class RecordingPrefill:
    """Wraps a PrefillWorker stub: records prefill_seconds of every Prefill answer by request id."""

    def __init__(self, stub: Any, seen: dict[str, float]) -> None:
        self._stub, self._seen = stub, seen

    def Prefill(self, request: Any, **kw: Any) -> Any:  # noqa: N802 - the stub's method name
        async def call() -> Any:
            response = await self._stub.Prefill(request, **kw)
            self._seen[request.request_id] = response.prefill_seconds
            return response
        return call()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stub, name)


def deploy_config(model: str) -> DeployConfig:
    return parse_config({
        "model": {"path": model, "block_size": 16},
        "router": {"port": 0, "heartbeat_seconds": 2.0},
        "prefill": {"tensor_parallel_size": 1, "num_kv_blocks": 512, "resources": {"num_cpus": 0.25}},
        "decode": {"num_kv_blocks": 512, "resources": {"num_cpus": 0.25}},
    }, "router_overhead benchmark")


async def client(address: str, concurrency: int, rounds: int, prompt_len: int) -> dict[str, float]:
    """Child process: waves of `concurrency` requests; client TTFT (seconds) by request id."""
    import grpc
    from pdserve.v1 import router_pb2_grpc

    from router.client import build_request

    ttft: dict[str, float] = {}
    async with grpc.aio.insecure_channel(address) as channel:
        stub = router_pb2_grpc.RouterStub(channel)

        async def one(rid: str, i: int) -> None:
            prompt = [1 + (i * 7 + k) % 900 for k in range(prompt_len)]
            start = time.perf_counter()
            call = stub.Generate(build_request(prompt, max_tokens=2, request_id=rid), timeout=120)
            async for _ in call:
                ttft.setdefault(rid, time.perf_counter() - start)

        for r in range(rounds + 1):  # round 0 warms up
            await asyncio.gather(*(one(f"w{r}-{i}" if r == 0 else f"r{r}-{i}", i) for i in range(concurrency)))
    return {k: v for k, v in ttft.items() if not k.startswith("w")}


def percentiles(values: list[float]) -> dict[str, float]:
    q = statistics.quantiles(values, n=100, method="inclusive")
    return {"p50": statistics.median(values), "p90": q[89], "p99": q[98]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--out", default="docs/figures")
    parser.add_argument("--client", help=argparse.SUPPRESS)  # child mode: the router's address
    args = parser.parse_args()
    if args.client:
        print(json.dumps(asyncio.run(client(args.client, args.concurrency, args.rounds, args.prompt_len))))
        return 0
    from engine.make_model import make_model

    seen: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as scratch:
        model = str(make_model(Path(scratch) / "tiny", arch="llama", size="tiny"))
        with running(deploy_config(model)) as (cluster, _):
            for replica in cluster.router.registry.replicas.values():
                replica.prefill = RecordingPrefill(replica.prefill, seen)  # type: ignore[assignment]
            child = subprocess.run(
                [sys.executable, __file__, "--client", cluster.address, "--concurrency", str(args.concurrency),
                 "--rounds", str(args.rounds), "--prompt-len", str(args.prompt_len)],
                capture_output=True, text=True, check=True, timeout=600)
    ttft = json.loads(child.stdout.strip().splitlines()[-1])
    overhead_ms = [1000 * (ttft[rid] - seen[rid]) for rid in ttft if rid in seen]
    result = {"concurrency": args.concurrency, "requests": len(overhead_ms), "prompt_len": args.prompt_len,
              "overhead_ms": percentiles(overhead_ms),
              "client_ttft_ms": percentiles([1000 * v for v in ttft.values()]),
              "prefill_ms": percentiles([1000 * seen[rid] for rid in ttft if rid in seen])}
    result["overhead_ms_each"] = sorted(overhead_ms)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = f"router_overhead_c{args.concurrency}"
    (out / f"{name}.json").write_text(json.dumps(result, indent=2))
    plot_cdf(sorted(overhead_ms), args.concurrency, out / f"{name}.png")
    print(json.dumps({k: v for k, v in result.items() if k != "overhead_ms_each"}, indent=2))
    return 0


def plot_cdf(values: list[float], concurrency: int, path: Path) -> None:
    ax = new_axes()
    ax.plot(values, [(i + 1) / len(values) for i in range(len(values))], drawstyle="steps-post")
    ax.axvline(1.0, color="grey", linestyle="--", label="goal: p50 < 1 ms")
    ax.set(xlabel="router overhead per request (ms)", ylabel="fraction of requests",
           title=f"client TTFT - replica TTFT, {concurrency} concurrent")
    save(ax, path)


if __name__ == "__main__":
    raise SystemExit(main())
