"""The OpenAI HTTP door vs gRPC (issue 12): streamed tokens/s through each door of the same null-model
router at 1 and 32 concurrent streams, same run (goal: HTTP >= 0.8x gRPC); and the HTTP stack choice,
aiohttp vs Starlette + uvicorn, streaming the same SSE chunks.

    python benchmarks/openai_http.py [--tokens 2000] [--repeats 3] [--out docs/figures]

Doors: the null router (benchmarks/loadgen/null_cluster.py: the real router, model-free workers) runs
in one process with both doors open, the null workers in another, the client in this one. Two decode
modes: `engine` (the real DecodeService over a NullEngine: tokens leave per engine step, merged
when they pile up, as with a real model) and `1/msg` (one token per message: the worst case, every
token is one protobuf message and one SSE event). A stream = one request of `tokens` tokens (32
streams: `tokens` / 4 each); the HTTP client reads `POST /v1/completions` with `stream: true`,
parses every event's JSON and takes the token count from the usage chunk; the gRPC client reads
`Router.Generate`. Each repeat measures every (mode, door, streams) in turn; medians are reported.

Stacks: a minimal SSE endpoint in each stack (its own process; uvicorn on the plain asyncio loop, as
it would run inside the router's loop), streaming chunk-sized JSON events that each wait one loop
turn (as a real one waits for its token); the same aiohttp client reads them. Events/s at 1 and 32
streams.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import grpc

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pdserve.v1 import router_pb2_grpc  # noqa: E402

from router.client import build_request  # noqa: E402

CHUNK = {"id": "cmpl-0123456789abcdef", "object": "text_completion", "created": 1764000000,
         "model": "null", "choices": [{"index": 0, "text": " token", "logprobs": None, "finish_reason": None}]}
One = Callable[[int], Awaitable[tuple[int, int]]]  # tokens asked -> (tokens, messages) received


async def _rate(one: One, streams: int, tokens: int) -> tuple[float, float]:
    """(tokens/s, tokens per message) of `streams` concurrent streams."""
    per = tokens if streams == 1 else max(1, tokens // 4)
    start = time.perf_counter()
    got = await asyncio.gather(*(one(per) for _ in range(streams)))
    elapsed = time.perf_counter() - start
    assert all(n == per for n, _ in got), f"asked {per} tokens per stream, got {got}"
    total = sum(n for n, _ in got)
    return total / elapsed, total / max(1, sum(m for _, m in got))


def grpc_door(stub: router_pb2_grpc.RouterStub) -> One:
    async def one(tokens: int) -> tuple[int, int]:
        n = messages = 0
        async for msg in stub.Generate(build_request([1, 2, 3], max_tokens=tokens, ignore_eos=True)):
            n += len(msg.token_ids)
            messages += 1
        return n, messages
    return one


async def _sse_events(resp: aiohttp.ClientResponse) -> list[Any]:
    events = []
    async for line in resp.content:
        if line.startswith(b"data: ") and line[6:].strip() != b"[DONE]":
            events.append(json.loads(line[6:]))
    return events


def http_door(session: aiohttp.ClientSession, url: str) -> One:
    async def one(tokens: int) -> tuple[int, int]:
        body = {"model": "null", "prompt": [1, 2, 3], "max_tokens": tokens, "ignore_eos": True,
                "stream": True, "stream_options": {"include_usage": True}}
        async with session.post(f"{url}/v1/completions", json=body) as resp:
            resp.raise_for_status()
            events = await _sse_events(resp)
        return int(events[-1]["usage"]["completion_tokens"]), len(events) - 1
    return one


async def _doors(grpc_address: str, http_address: str, tokens: int) -> dict[str, float]:
    """tokens/s per door and load, and tokens per message (`... tok/msg`)."""
    out = {}
    connector = aiohttp.TCPConnector(limit=0)
    async with grpc.aio.insecure_channel(grpc_address) as channel, \
            aiohttp.ClientSession(connector=connector) as session:
        doors = {"grpc": grpc_door(router_pb2_grpc.RouterStub(channel)),
                 "http": http_door(session, f"http://{http_address}")}
        for door in doors.values():
            await _rate(door, 4, 64)  # warm-up: connections, code paths
        for streams in (1, 32):
            for name, door in doors.items():
                rate, per_message = await _rate(door, streams, tokens)
                out[f"{name}@{streams}"], out[f"{name}@{streams} tok/msg"] = rate, per_message
    return out


def measure_doors(tokens: int, repeats: int) -> dict[str, list[float]]:
    from benchmarks.loadgen.null_cluster import null_processes_http  # imports torch: not in --serve

    runs: dict[str, list[float]] = {}
    for _ in range(repeats):
        for mode in ("engine", 1):
            with null_processes_http(decode=mode) as (grpc_address, http_address):
                label = "engine" if mode == "engine" else "1/msg"
                for key, value in asyncio.run(_doors(grpc_address, http_address, tokens)).items():
                    runs.setdefault(f"{label} {key}", []).append(value)
    return runs


# ---------------------------------------------------------------- the stack comparison


def _sse(obj: object) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


def serve_aiohttp(port: int) -> None:
    from aiohttp import web

    async def handle(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for _ in range(int(request.query["n"])):
            await asyncio.sleep(0)
            await resp.write(_sse(CHUNK))
        await resp.write(b"data: [DONE]\n\n")
        return resp

    app = web.Application()
    app.router.add_get("/sse", handle)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None, handler_cancellation=True)


def serve_starlette(port: int) -> None:
    import uvicorn
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import StreamingResponse
    from starlette.routing import Route

    async def events(n: int) -> Any:
        for _ in range(n):
            await asyncio.sleep(0)
            yield _sse(CHUNK)
        yield b"data: [DONE]\n\n"

    async def handle(request: Request) -> StreamingResponse:
        return StreamingResponse(events(int(request.query_params["n"])), media_type="text/event-stream")

    app = Starlette(routes=[Route("/sse", handle)])
    uvicorn.run(app, host="127.0.0.1", port=port, loop="asyncio", log_level="error", access_log=False)


async def _stack_rates(port: int, tokens: int) -> dict[str, float]:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        async def one(n: int) -> tuple[int, int]:
            async with session.get(f"http://127.0.0.1:{port}/sse", params={"n": str(n)}) as resp:
                events = len(await _sse_events(resp))
                return events, events
        await _rate(one, 4, 64)
        return {f"@{s}": (await _rate(one, s, tokens))[0] for s in (1, 32)}


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _wait_port(port: int, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)


def measure_stacks(tokens: int, repeats: int) -> dict[str, list[float]]:
    runs: dict[str, list[float]] = {}
    for _ in range(repeats):
        for stack in ("aiohttp", "starlette+uvicorn"):
            port = _free_port()
            server = subprocess.Popen([sys.executable, __file__, "--serve", stack, "--port", str(port)],
                                      env={**os.environ, "PYTHONWARNINGS": "ignore"})
            try:
                asyncio.run(_wait_port(port))
                for key, value in asyncio.run(_stack_rates(port, tokens)).items():
                    runs.setdefault(f"{stack} {key}", []).append(value)
            finally:
                server.terminate()
                server.wait(10)
    return runs


def _report(title: str, runs: dict[str, list[float]]) -> dict[str, float]:
    medians = {k: statistics.median(v) for k, v in runs.items()}
    print(f"\n{title}")
    for key, value in medians.items():
        unit = "tokens/message" if key.endswith("tok/msg") else "/s"
        print(f"  {key:<32} {value:>10,.1f} {unit}   runs: {', '.join(f'{x:,.1f}' for x in runs[key])}")
    return medians


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=2000, help="tokens of one stream (32 streams: 1/4 each)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=None, help="directory for openai_http.json")
    p.add_argument("--part", choices=("doors", "stacks", "both"), default="both")
    p.add_argument("--serve", choices=("aiohttp", "starlette+uvicorn"), help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.serve:
        (serve_aiohttp if args.serve == "aiohttp" else serve_starlette)(args.port)
        return
    doors: dict[str, float] = {}
    stacks: dict[str, float] = {}
    door_runs: dict[str, list[float]] = {}
    stack_runs: dict[str, list[float]] = {}
    if args.part in ("doors", "both"):
        door_runs = measure_doors(args.tokens, args.repeats)
        doors = _report("tokens/s through each door (null model), and tokens per message", door_runs)
        for mode in ("engine", "1/msg"):
            for s in (1, 32):
                ratio = doors[f"{mode} http@{s}"] / doors[f"{mode} grpc@{s}"]
                print(f"  {mode} @{s}: HTTP / gRPC = {ratio:.2f}")
    if args.part in ("stacks", "both"):
        stack_runs = measure_stacks(args.tokens, args.repeats)
        stacks = _report("SSE events/s by HTTP stack", stack_runs)
    if args.out:
        path = Path(args.out) / "openai_http.json"
        path.write_text(json.dumps({"doors": doors, "stacks": stacks, "load": os.getloadavg(),
                                    "runs": {**door_runs, **stack_runs}}, indent=2) + "\n")
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
