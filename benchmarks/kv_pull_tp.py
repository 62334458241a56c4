"""KV pull of one prompt from a prefill TP group into a decode TP group, in real processes over UCX:
prefill TP 2 -> decode TP 2 (each decode rank pulls its half of the heads, both at once) against
prefill TP 2 -> decode TP 1 (one rank pulls every head from both prefill ranks), same run.

    python benchmarks/kv_pull_tp.py [--tokens 2048] [--repeats 9] [--modes ucx,ucx-payload] [--heads 8]

Every rank is its own process (spawned), as in a served cluster: 2 prefill ranks each serving its
KV heads with a UCXSource over a memfd pool, and the decode ranks each pulling with a UCXPuller
(KV re-sharding by kv_transfer.reshard). The layout is the kv_transfer benchmark's: 8 layers,
`--heads` KV heads, head_dim 64, fp32, 16-token blocks. One measurement: every decode rank starts
its pull at the same signal; time = last end - first start (CLOCK_MONOTONIC is system-wide).
Modes: `ucx` = the same-host read (decode ranks copy from the prefill ranks' mapped pools),
`ucx-payload` = the payload sent over UCX (shared memory on one host).
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import statistics
import sys
import time
from typing import Any

import torch

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]  # see kv_transfer.py

from engine.kv_cache import shareable_zeros  # noqa: E402 - after the sys.path fix above
from engine.tp import kv_heads_per_rank  # noqa: E402

L, B, D = 8, 16, 64
PREFILL_TP = 2


def source_main(rank: int, heads: int, num_blocks: int, conn: Any) -> None:
    """A prefill rank: its KV heads of every block, leased to request "bench"."""
    torch.set_num_threads(1)
    from kv_transfer.ucx import UCXSource

    async def serve() -> None:
        kv = shareable_zeros((num_blocks, L, 2, kv_heads_per_rank(heads, PREFILL_TP), B, D), torch.float32)
        kv.copy_(torch.randn(kv.shape))
        source = UCXSource(kv, rank, PREFILL_TP, heads)
        conn.send(await source.start("127.0.0.1"))
        source.lease("bench", list(range(num_blocks)), time.time() + 3600)
        await asyncio.get_running_loop().run_in_executor(None, conn.recv)  # until told to stop
        await source.close()

    asyncio.run(serve())


def puller_main(rank: int, tp: int, heads: int, endpoints: list[str], mode: str, tokens: int, conn: Any) -> None:
    """A decode rank: on each "go", pulls the prompt's blocks and answers (start, end, bytes)."""
    torch.set_num_threads(1)
    from kv_transfer.handle import KVHandle, RankShard
    from kv_transfer.ucx import UCXConfig, UCXPuller

    n = -(-tokens // B)
    kv = shareable_zeros((n, L, 2, kv_heads_per_rank(heads, tp), B, D), torch.float32)
    puller = UCXPuller(kv, rank, tp, heads, UCXConfig(same_host_read=mode == "ucx"))
    shards = tuple(RankShard(r, e, tuple(range(n))) for r, e in enumerate(endpoints))
    handle = KVHandle("bench", tokens, B, L, heads, D, "float32", PREFILL_TP, shards, time.time() + 3600)

    async def run() -> None:
        await puller.pull(handle, list(range(n)), timeout=120)  # connects and maps: not counted
        conn.send("ready")
        loop = asyncio.get_running_loop()
        while await loop.run_in_executor(None, conn.recv) == "go":
            start = time.monotonic()
            await puller.pull(handle, list(range(n)), timeout=120)
            conn.send((start, time.monotonic(), kv.nbytes))
        await puller.close()

    asyncio.run(run())


def measure(ctx: Any, decode_tp: int, heads: int, endpoints: list[str], mode: str, tokens: int,
            repeats: int) -> tuple[float, int]:
    """Median seconds of a whole pull (all decode ranks) and the bytes it moved."""
    pipes, procs = [], []
    for rank in range(decode_tp):
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=puller_main, args=(rank, decode_tp, heads, endpoints, mode, tokens, child))
        proc.start()
        pipes.append(parent)
        procs.append(proc)
    for p in pipes:
        assert p.recv() == "ready"
    times, nbytes = [], 0
    for _ in range(repeats):
        for p in pipes:
            p.send("go")
        results = [p.recv() for p in pipes]
        times.append(max(r[1] for r in results) - min(r[0] for r in results))
        nbytes = sum(r[2] for r in results)
    for p in pipes:
        p.send("stop")
    for proc in procs:
        proc.join(30)
    return statistics.median(times), nbytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--heads", type=int, default=8, help="KV heads of the model")
    parser.add_argument("--modes", default="ucx,ucx-payload")
    args = parser.parse_args()
    os.environ.setdefault("UCX_WARN_UNUSED_ENV_VARS", "n")
    torch.set_num_threads(1)
    ctx = mp.get_context("spawn")
    num_blocks = -(-args.tokens // B)
    sources, pipes = [], []
    for rank in range(PREFILL_TP):
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=source_main, args=(rank, args.heads, num_blocks, child), daemon=True)
        proc.start()
        sources.append(proc)
        pipes.append(parent)
    endpoints = [p.recv() for p in pipes]
    print(f"prompt {args.tokens} tokens, {args.heads} KV heads, {L} layers, head_dim {D}, fp32, "
          f"prefill TP {PREFILL_TP}, median of {args.repeats}")
    print(f"{'mode':<12} {'decode TP':>9} {'MiB moved':>10} {'pull ms':>8} {'GB/s':>6}")
    try:
        for mode in args.modes.split(","):
            for decode_tp in (2, 1):
                seconds, nbytes = measure(ctx, decode_tp, args.heads, endpoints, mode, args.tokens, args.repeats)
                print(f"{mode:<12} {decode_tp:>9} {nbytes / 2**20:>10.1f} {seconds * 1e3:>8.1f} "
                      f"{nbytes / seconds / 1e9:>6.2f}", flush=True)
    finally:
        for p in pipes:
            p.send("stop")
        for proc in sources:
            proc.join(10)


if __name__ == "__main__":
    main()
