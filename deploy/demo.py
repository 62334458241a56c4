"""`pdserve demo`: the default cluster, a few concurrent prompts streamed with TTFT/TPOT, shutdown."""

from __future__ import annotations

import asyncio
import dataclasses
import sys
import time

import grpc
from pdserve.v1 import router_pb2_grpc

from deploy.cluster import Cluster
from deploy.config import load_config
from router.client import build_request

DEMO_PROMPTS = (
    "The list data type",
    "A function definition",
    "The for statement is used to",
    "Exceptions are raised when",
)


@dataclasses.dataclass(slots=True)
class Result:
    prompt: str
    text: str = ""
    tokens: int = 0
    ttft: float = 0.0
    total: float = 0.0

    @property
    def tpot_ms(self) -> float:
        return 1000 * (self.total - self.ttft) / max(1, self.tokens - 1)


async def stream_one(stub: router_pb2_grpc.RouterStub, prompt: str, max_tokens: int, live: bool) -> Result:
    result = Result(prompt)
    start = time.perf_counter()
    request = build_request(prompt, max_tokens=max_tokens)
    async for msg in stub.Generate(request, timeout=120):
        if result.tokens == 0:
            result.ttft = time.perf_counter() - start
        result.tokens += len(msg.token_ids)
        result.text += msg.text
        if live:
            sys.stdout.write(msg.text)
            sys.stdout.flush()
    result.total = time.perf_counter() - start
    return result


async def demo(config: str | None, max_tokens: int) -> None:
    cfg = load_config(config)
    http_off = dataclasses.replace(cfg.router.http, port=None)  # the demo speaks gRPC only
    cfg = dataclasses.replace(cfg, router=dataclasses.replace(cfg.router, port=0, http=http_off))
    cluster = Cluster(cfg)
    print("starting Ray, the prefill pool (TP=2), the decode pool and the router...", flush=True)
    t0 = time.perf_counter()
    try:
        address = await cluster.start()
        print(f"router SERVING on {address} after {time.perf_counter() - t0:.1f}s\n", flush=True)
        async with grpc.aio.insecure_channel(address) as channel:
            stub = router_pb2_grpc.RouterStub(channel)
            print(f"[1] {DEMO_PROMPTS[0]}", end="", flush=True)
            results = await asyncio.gather(
                *(stream_one(stub, p, max_tokens, live=(i == 0)) for i, p in enumerate(DEMO_PROMPTS))
            )
        print()
        for i, r in enumerate(results, 1):
            if i > 1:
                print(f"[{i}] {r.prompt}{r.text}")
        print("\nrequest  tokens  TTFT ms  TPOT ms")
        for i, r in enumerate(results, 1):
            print(f"[{i}]      {r.tokens:6d}  {1000 * r.ttft:7.1f}  {r.tpot_ms:7.1f}")
    finally:
        print("\nshutting down...", flush=True)
        await cluster.stop()


def run_demo(config: str | None, max_tokens: int) -> int:
    asyncio.run(demo(config, max_tokens))
    return 0
