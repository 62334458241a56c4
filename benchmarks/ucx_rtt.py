"""Round trip of one small control message over UCX, as pdserve's KV source and puller exchange them
(issue 14: where a pull's fixed cost goes now that nothing spins).

    python benchmarks/ucx_rtt.py [--round-trips 500] [--hop]

Two processes on this host, each with pdserve's UCX loop (kv_transfer.ucx_loop: the loop sleeps
in epoll on the UCX worker's descriptor and progresses UCX itself when it wakes). The client sends a 100-byte control
frame (`kv_transfer.ucx.send_message`) and waits for the echo, --round-trips times; p50 and p90 after
the first 10%. --hop starts every round trip from another event loop, as a pull does (one
`on_ucx_loop` hand-over each way). A pull by the same-host read costs two such round trips plus the
hop; a payload pull one round trip plus the payload.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

FRAME = b"x" * 100


def echo_server(ports: Any, count: int) -> None:
    import ucxx

    from kv_transfer.ucx import recv_message, send_message
    from kv_transfer.ucx_loop import on_ucx_loop

    async def serve() -> None:
        finished = asyncio.Event()

        async def handler(ep: Any) -> None:
            for _ in range(count):
                await send_message(ep, await recv_message(ep, 1 << 20) or b"")
            finished.set()

        listener = ucxx.create_listener(handler, port=0)
        ports.put(listener.port)
        await finished.wait()
        await asyncio.sleep(0.1)  # the handler returns
        listener.close()

    asyncio.run(on_ucx_loop(serve()))


async def round_trips(port: int, count: int, hop: bool) -> list[float]:
    import ucxx

    from kv_transfer.ucx import recv_message, send_message
    from kv_transfer.ucx_loop import on_ucx_loop

    ep = await on_ucx_loop(ucxx.create_endpoint("127.0.0.1", port))

    async def one() -> None:
        await send_message(ep, FRAME)
        await recv_message(ep, 1 << 20)

    async def all_on_loop() -> list[float]:
        took = []
        for _ in range(count):
            t0 = time.perf_counter()
            await one()
            took.append(time.perf_counter() - t0)
        return took

    if not hop:
        took = await on_ucx_loop(all_on_loop())
    else:
        took = []
        for _ in range(count):
            t0 = time.perf_counter()
            await on_ucx_loop(one())
            took.append(time.perf_counter() - t0)
    await on_ucx_loop(ep.close())
    return took


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--round-trips", type=int, default=500)
    parser.add_argument("--hop", action="store_true", help="each round trip handed over from another loop")
    args = parser.parse_args()
    ctx = mp.get_context("spawn")
    ports = ctx.Queue()
    server = ctx.Process(target=echo_server, args=(ports, args.round_trips), daemon=True)
    server.start()
    took = asyncio.run(round_trips(ports.get(timeout=60), args.round_trips, args.hop))
    server.join(10)
    kept = sorted(took[len(took) // 10 :])
    print(f"{'with the hop' if args.hop else 'on the UCX loop'}: round trip p50 "
          f"{1e6 * statistics.median(kept):.0f} us, p90 {1e6 * kept[int(0.9 * len(kept))]:.0f} us "
          f"({len(kept)} round trips)")


if __name__ == "__main__":
    main()
