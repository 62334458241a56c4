"""`pdserve bench --endpoint openai`: the same workloads through POST /v1/completions (SSE).

Each request sends its prompt as token ids with `max_tokens`, `ignore_eos`, `stream` and
`stream_options.include_usage`; every chunk with a choice is a message (its arrival time is what
the gRPC runner records for a message with tokens), the usage chunk gives the output tokens.
Errors are recorded as `HTTP_<status>` (or the SSE error's `code`).
"""

from __future__ import annotations

import json
import ssl
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp

from benchmarks.loadgen.config import BenchConfig
from benchmarks.loadgen.dataset import RequestSpec
from benchmarks.loadgen.stats import RequestRecord


def base_url(cfg: BenchConfig) -> str:
    scheme = "https" if cfg.root_ca else "http"
    return f"{scheme}://{cfg.address}/v1"


def _headers(cfg: BenchConfig) -> dict[str, str]:
    headers = {"x-request-timeout": str(cfg.timeout_s)}
    if cfg.api_key:
        headers["Authorization"] = f"Bearer {cfg.api_key}"
    return headers


async def _served_model(session: aiohttp.ClientSession, url: str, headers: dict[str, str]) -> str:
    async with session.get(f"{url}/models", headers=headers) as resp:
        resp.raise_for_status()
        return str((await resp.json())["data"][0]["id"])


def _event(line: bytes) -> Any:
    """The JSON of one `data:` line; None for other lines, "" for [DONE]."""
    if not line.startswith(b"data:"):
        return None
    data = line[5:].strip()
    return "" if data == b"[DONE]" else json.loads(data)


async def _read_stream(resp: aiohttp.ClientResponse, rec: RequestRecord, t0: float) -> None:
    finished = False
    async for line in resp.content:
        event = _event(line)
        if event == "":
            break
        if not event:
            continue
        if "error" in event:
            rec.error = str(event["error"].get("code") or "SSE_ERROR").upper()
            return
        choices = event.get("choices")
        if choices:
            rec.message_times.append(time.perf_counter() - t0)
            finished = finished or choices[0].get("finish_reason") is not None
        if event.get("usage"):
            rec.output_tokens = int(event["usage"]["completion_tokens"])
    if not finished:
        rec.error = "NO_FINISH_REASON"


@asynccontextmanager
async def openai_sender(cfg: BenchConfig) -> AsyncIterator[Any]:
    """A runner.Send over one aiohttp session (connections reused, no limit on their number)."""
    context = ssl.create_default_context(cafile=cfg.root_ca) if cfg.root_ca else None
    connector = aiohttp.TCPConnector(limit=0, ssl=context if context is not None else False)
    timeout = aiohttp.ClientTimeout(total=cfg.timeout_s)
    url, headers = base_url(cfg), _headers(cfg)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        model = await _served_model(session, url, headers)

        async def send(spec: RequestSpec, rec: RequestRecord, t0: float) -> None:
            body = {"model": model, "prompt": list(spec.prompt_ids), "max_tokens": spec.max_tokens,
                    "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
            rec.sent = time.perf_counter() - t0
            try:
                async with session.post(f"{url}/completions", json=body, headers=headers) as resp:
                    if resp.status != 200:
                        rec.error = f"HTTP_{resp.status}"
                    else:
                        await _read_stream(resp, rec, t0)
            except (aiohttp.ClientError, TimeoutError) as e:
                rec.error = type(e).__name__
            rec.done = time.perf_counter() - t0

        yield send
