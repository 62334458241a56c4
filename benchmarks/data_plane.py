"""Data plane: streamed tokens/s end to end through the router vs a Ray Serve handle streaming one
item per token, same run (issue 3). Goal: the router path >= 10x the Serve handle.

    python benchmarks/data_plane.py [--streams 16] [--tokens 2000] [--repeats 3] [--out DIR]

No model anywhere: prefill answers at once, decode emits tokens instantly. Three paths, each with
`streams` concurrent streams of `tokens` tokens, measured in turn `repeats` times (medians reported):
  router+engine   client -> real router -> the real DecodeService driven by a NullEngine (tokens
                  leave in per-step messages, merged when they pile up, as with a real model)
  router+1/msg    client -> real router -> a null decode worker sending ONE token per message (the
                  worst case: no merging anywhere)
  serve-handle    driver -> `handle.options(stream=True)` on a Serve deployment whose generator
                  yields one item per token
Client, router and workers are separate processes (as deployed); the Serve replica is a Ray actor.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pdserve.v1 import router_pb2_grpc  # noqa: E402

from benchmarks.loadgen.null_cluster import null_processes  # noqa: E402
from router.client import build_request  # noqa: E402

Stream = Callable[[int], AsyncIterator[int]]


async def _tokens_per_s(open_stream: Stream, streams: int, tokens: int) -> float:
    """`streams` concurrent streams of `tokens` items each; every one must arrive."""
    async def one() -> int:
        n = 0
        async for k in open_stream(tokens):
            n += k
        return n

    start = time.perf_counter()
    counts = await asyncio.gather(*(one() for _ in range(streams)))
    elapsed = time.perf_counter() - start
    assert counts == [tokens] * streams, counts
    return sum(counts) / elapsed


def router_stream(stub: router_pb2_grpc.RouterStub) -> Stream:
    async def stream(tokens: int) -> AsyncIterator[int]:
        request = build_request([1, 2, 3, 4], max_tokens=tokens, ignore_eos=True)
        async for msg in stub.Generate(request, timeout=300):
            yield len(msg.token_ids)

    return stream


def serve_stream(handle: Any) -> Stream:
    async def stream(tokens: int) -> AsyncIterator[int]:
        async for _ in handle.options(stream=True).stream.remote(tokens):
            yield 1

    return stream


def start_serve(streams: int) -> Any:
    import ray
    from ray import serve

    @serve.deployment(max_ongoing_requests=4 * streams, ray_actor_options={"num_cpus": 0})
    class TokenStream:
        def stream(self, n: int) -> Any:
            yield from range(n)

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    serve.start(proxy_location="Disabled")
    return serve.run(TokenStream.bind(), name="data-plane-bench", route_prefix=None)  # type: ignore[attr-defined]


def stop_serve() -> None:
    import ray
    from ray import serve

    serve.shutdown()
    ray.shutdown()


async def measure(paths: dict[str, Stream], streams: int, tokens: int, repeats: int) -> dict[str, list[float]]:
    results: dict[str, list[float]] = {name: [] for name in paths}
    for path in paths.values():  # warm-up: connections, Serve's first-call set-up
        await _tokens_per_s(path, 2, 100)
    for r in range(repeats):
        for name, path in paths.items():
            rate = await _tokens_per_s(path, streams, tokens)
            results[name].append(rate)
            print(f"  repeat {r + 1}: {name:<14} {rate:10.0f} tokens/s", file=sys.stderr, flush=True)
    return results


async def run(args: argparse.Namespace, addresses: dict[str, str], handle: Any) -> dict[str, list[float]]:
    channels = {name: grpc.aio.insecure_channel(a) for name, a in addresses.items()}
    paths: dict[str, Stream] = {n: router_stream(router_pb2_grpc.RouterStub(c)) for n, c in channels.items()}
    paths["serve-handle"] = serve_stream(handle)
    try:
        return await measure(paths, args.streams, args.tokens, args.repeats)
    finally:
        for c in channels.values():
            await c.close()


def report(results: dict[str, list[float]], args: argparse.Namespace) -> dict[str, Any]:
    medians = {name: statistics.median(v) for name, v in results.items()}
    base = medians["serve-handle"]
    out = {"streams": args.streams, "tokens_per_stream": args.tokens, "repeats": args.repeats,
           "tokens_per_s": results, "median_tokens_per_s": medians,
           "ratio_vs_serve_handle": {n: m / base for n, m in medians.items()}}
    print(f"\n{'path':<16}{'median tokens/s':>16}{'x serve handle':>16}")
    for name, m in medians.items():
        print(f"{name:<16}{m:16.0f}{m / base:16.1f}")
    return out


def plot(out: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(out["median_tokens_per_s"])
    fig, ax = plt.subplots(figsize=(6, 3.5))
    bars = ax.bar(names, [out["median_tokens_per_s"][n] for n in names], color=["C0", "C1", "C7"])
    for bar, n in zip(bars, names, strict=True):
        ax.annotate(f"{out['ratio_vs_serve_handle'][n]:.1f}x", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center", va="bottom")
    ax.set_yscale("log")
    ax.set_ylabel("streamed tokens/s (log)")
    ax.set_title(f"{out['streams']} streams x {out['tokens_per_stream']} tokens, null model")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--streams", type=int, default=16)
    p.add_argument("--tokens", type=int, default=2000)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=None, help="directory for data_plane.json and data_plane.png")
    args = p.parse_args()
    with ExitStack() as stack:
        addresses = {"router+engine": stack.enter_context(null_processes("engine")),
                     "router+1/msg": stack.enter_context(null_processes(1))}
        handle = start_serve(args.streams)
        stack.callback(stop_serve)
        results = asyncio.run(run(args, addresses, handle))
    out = report(results, args)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        Path(args.out, "data_plane.json").write_text(json.dumps(out, indent=1))
        plot(out, Path(args.out, "data_plane.png"))


if __name__ == "__main__":
    main()
