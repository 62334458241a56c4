"""KV pull bandwidth between two processes (source in a spawned process, puller here) against an
in-process memcpy of the same bytes, for the UCX and torch.distributed backends.

    python benchmarks/kv_transfer.py [--sizes 1,4,16,64,256] [--repeats 5] [--backends ucx,ucx-payload,torch]
                                     [--pattern contiguous|scattered] [--no-shm] [--tls TLS]

One block is 1 MiB (8 layers, K+V, 8 heads, 16 tokens, head_dim 64, fp32). `contiguous` pulls a
run of blocks into a run at another offset (zero-copy on both sides); `scattered` pulls randomly
permuted block ids (gather at the source, scatter at the puller). GB/s = bytes / median seconds.

`raw UCX` is `ucx_perftest -t tag_bw` (from the libucx wheel) between two processes on this host,
run beside each size with the same message size and UCX settings (the median of 5 runs): the
transport's own ceiling for the UCX payload path (`ucx-payload`), which carries the same bytes as
tagged messages. It streams one cache-hot buffer back to back with many messages in flight, where a
pull moves KV once, after a request, from buffers a memcpy has just evicted.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import re
import statistics
import subprocess
import sys
import time
from typing import Any

import torch

# Run as a script, this file's folder comes first on sys.path and its name would shadow the
# kv_transfer package: drop it (spawned processes inherit the fixed path).
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]

from engine.kv_cache import shareable_zeros  # noqa: E402 - after the sys.path fix above
from kv_transfer import serve_on_running_loop  # noqa: E402
from kv_transfer.ucx_loop import DEFAULT_TLS  # noqa: E402

L, H, B, D = 8, 8, 16, 64  # one block: L * 2 * H * B * D * 4 bytes = 1 MiB
BLOCK_BYTES = L * 2 * H * B * D * 4
# The puller runs every backend on this one loop, which lives as long as the process (as a decode
# replica's does), so UCX may run on it (kv_transfer.serve_on_running_loop).
PULLER_LOOP = asyncio.new_event_loop()
RAW_RUNS = 5  # ucx_perftest runs per size; the raw figure is their median


def make_source(backend: str, kv: torch.Tensor) -> Any:
    if backend.startswith("ucx"):
        from kv_transfer.ucx import UCXSource

        return UCXSource(kv, 0, 1, H)
    from kv_transfer.torch_dist import TorchDistSource

    return TorchDistSource(kv, 0, 1, H)


def make_puller(backend: str, kv: torch.Tensor, shm: bool) -> Any:
    if backend.startswith("ucx"):
        from kv_transfer.ucx import UCXConfig, UCXPuller

        config = UCXConfig(shared_memory=shm, same_host_read=backend == "ucx")
        return UCXPuller(kv, 0, 1, H, config)
    from kv_transfer.torch_dist import TorchDistPuller

    return TorchDistPuller(kv, 0, 1, H)


def serve_on_this_loop(backend: str) -> None:
    """As a serving replica does before it makes a source or puller: both UCX variants are the
    `ucx` backend, which then runs on this loop instead of a thread of its own (one hop per pull)."""
    serve_on_running_loop("ucx" if backend.startswith("ucx") else backend)


def source_main(backend: str, num_blocks: int, conn: Any) -> None:
    torch.set_num_threads(1)

    async def serve() -> None:
        serve_on_this_loop(backend)  # as a prefill replica's loop does
        kv = shareable_zeros((num_blocks, L, 2, H, B, D), torch.float32)  # as the engine allocates it
        kv.copy_(torch.randn(kv.shape))
        source = make_source(backend, kv)
        conn.send(await source.start("127.0.0.1"))
        source.lease("bench", list(range(num_blocks)), time.time() + 3600)
        while not conn.poll():
            await asyncio.sleep(0.05)
        await source.close()

    asyncio.run(serve())


def src_dst_ids(n: int, num_blocks: int, pattern: str) -> tuple[list[int], list[int]]:
    if pattern == "contiguous":
        return list(range(n)), list(range(num_blocks - n, num_blocks))
    g = torch.Generator().manual_seed(n)
    return torch.randperm(num_blocks, generator=g)[:n].tolist(), torch.randperm(num_blocks, generator=g)[:n].tolist()


def memcpy_once(kv: torch.Tensor, src: torch.Tensor) -> float:
    t0 = time.perf_counter()
    kv[: src.shape[0]].copy_(src)
    return time.perf_counter() - t0


async def measure(puller: Any, endpoint: str, n: int, pattern: str, repeats: int) -> tuple[float, float]:
    """Median seconds of a pull of n blocks and of a memcpy of the same bytes, interleaved so that
    both see the same machine load."""
    from kv_transfer.handle import KVHandle, RankShard

    num_blocks = puller.kv.shape[0]
    src, dst = src_dst_ids(n, num_blocks, pattern)
    shard = RankShard(0, endpoint, tuple(src))
    handle = KVHandle("bench", n * B, B, L, H, D, "float32", 1, (shard,), time.time() + 3600)
    copy_src = torch.randn(n, *puller.kv.shape[1:])
    await puller.pull(handle, dst, timeout=60)  # connects on first use: not counted
    pulls, copies = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        await puller.pull(handle, dst, timeout=60)
        pulls.append(time.perf_counter() - t0)
        copies.append(memcpy_once(puller.kv, copy_src))
    return statistics.median(pulls), statistics.median(copies)


def ucx_perftest(nbytes: int, iters: int, runs: int) -> float | None:
    """Median GB/s of `runs` runs of `ucx_perftest -t tag_bw -s nbytes -n iters` between two
    processes on loopback (one run of 20 x 16 MB lasts ~50 ms and moved 3.9-12.9 GB/s from run to
    run here); None if the tool is missing."""
    speeds = [gbps for gbps in (_perftest_once(nbytes, iters) for _ in range(runs)) if gbps is not None]
    return statistics.median(speeds) if speeds else None


def _perftest_once(nbytes: int, iters: int) -> float | None:
    import libucx

    root = os.path.dirname(libucx.__file__)
    exe = os.path.join(root, "bin", "ucx_perftest")
    if not os.path.exists(exe):
        return None
    env = dict(os.environ, LD_LIBRARY_PATH=os.path.join(root, "lib") + ":" + os.environ.get("LD_LIBRARY_PATH", ""))
    port = str(13000 + os.getpid() % 2000)
    server = subprocess.Popen([exe, "-p", port], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(50):  # the server needs a moment to listen
            client = subprocess.run([exe, "127.0.0.1", "-p", port, "-t", "tag_bw", "-s", str(nbytes), "-n", str(iters)],
                                    env=env, capture_output=True, text=True, timeout=120)
            final = re.search(r"Final:\s+\d+\s+(\S+\s+){4}(\S+)", client.stdout)  # overall MB/s
            if final:
                return float(final.group(2)) * 2**20 / 1e9  # MB/s (MiB) -> GB/s
            time.sleep(0.1)
        return None
    finally:
        server.kill()
        server.wait()


def run_backend(backend: str, sizes: list[int], args: argparse.Namespace) -> list[tuple[int, float, float]]:
    num_blocks = max(sizes) * (2**20) // BLOCK_BYTES
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=source_main, args=(backend, num_blocks, child), daemon=True)
    proc.start()
    if not parent.poll(120):
        proc.kill()
        raise RuntimeError(f"{backend} source process did not start")
    endpoint = parent.recv()
    kv = shareable_zeros((num_blocks, L, 2, H, B, D), torch.float32)
    puller = make_puller(backend, kv, not args.no_shm)
    rows = []

    async def run_sizes() -> None:
        serve_on_this_loop(backend)  # as a decode replica's loop does
        for mb in sizes:
            n = mb * 2**20 // BLOCK_BYTES
            pull, copy = await measure(puller, endpoint, n, args.pattern, args.repeats)
            rows.append((mb, n * BLOCK_BYTES / pull / 1e9, n * BLOCK_BYTES / copy / 1e9))
        await puller.close()

    try:
        PULLER_LOOP.run_until_complete(run_sizes())
    finally:
        parent.send("stop")
        proc.join(10)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1,4,16,64,256")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--backends", default="ucx,ucx-payload,torch",
                        help="ucx: same-host read from the source's pool; ucx-payload: the payload over UCX")
    parser.add_argument("--pattern", choices=["contiguous", "scattered"], default="contiguous")
    parser.add_argument("--no-shm", action="store_true", help="UCX payload over the tcp control connection")
    parser.add_argument("--tls", default=None, help="UCX_TLS for both processes (default: pdserve's, ^cma)")
    parser.add_argument("--no-raw", dest="raw", action="store_false", help="skip ucx_perftest")
    args = parser.parse_args()
    # pdserve's own default (kv_transfer.ucx_loop.DEFAULT_TLS) unless --tls: ucx_perftest, the
    # raw figure, must run with the same transports
    os.environ["UCX_TLS"] = args.tls or os.environ.get("UCX_TLS", DEFAULT_TLS)
    os.environ.setdefault("UCX_WARN_UNUSED_ENV_VARS", "n")
    torch.set_num_threads(1)
    sizes = [int(s) for s in args.sizes.split(",")]
    print(f"pattern={args.pattern} shm={not args.no_shm} UCX_TLS={os.environ.get('UCX_TLS', '(default)')}")
    raw = {mb: ucx_perftest(mb * 2**20, max(20, 2 * args.repeats), RAW_RUNS) for mb in sizes} if args.raw else {}
    print(f"{'backend':<11} {'MB':>5} {'pull GB/s':>10} {'memcpy GB/s':>12} {'ratio':>6} {'raw UCX GB/s':>13} {'vs raw':>7}")
    for backend in args.backends.split(","):
        for mb, pull, copy in run_backend(backend, sizes, args):
            ucx = raw.get(mb)
            raw_cols = f"{ucx:>13.2f} {pull / ucx:>7.2f}" if ucx else f"{'-':>13} {'-':>7}"
            print(f"{backend:<11} {mb:>5} {pull:>10.2f} {copy:>12.2f} {pull / copy:>6.0%} {raw_cols}", flush=True)


if __name__ == "__main__":
    main()
