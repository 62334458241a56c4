"""NullEngine: the decode-side surface of LLMEngine with no model, so the REAL decode service
(decode_worker.server.DecodeService on an AsyncEngine thread) can stream without computing.

Each `step()` emits one token per running request at once, like a model whose forward pass takes
no time; the service merges whatever piled up while its stream was busy into one message, exactly
as it does with a real engine.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import grpc
from pdserve.v1 import worker_pb2_grpc

from decode_worker.server import DecodeService
from engine.async_engine import AsyncEngine
from engine.engine import StepOutput
from engine.finish import FinishReason
from kv_transfer.handle import KVHandle

VOCAB = 32000


@dataclass(frozen=True, slots=True)
class NullModelConfig:
    vocab_size: int = VOCAB


class NullEngine:
    model_config = NullModelConfig()

    def __init__(self) -> None:
        self._prefilled: dict[str, tuple[int, int]] = {}
        self._running: dict[str, list[int]] = {}  # request id -> [last token, tokens left]

    def add_prefilled(self, request_id: str, prompt_token_ids: list[int], first_token: int,
                      params: Any) -> list[int]:
        self._prefilled[request_id] = (first_token, max(0, params.max_tokens - 1))
        return [0]

    def resume(self, request_id: str) -> None:
        last, left = self._prefilled.pop(request_id)
        self._running[request_id] = [last, left]

    def abort(self, request_id: str) -> None:
        self._prefilled.pop(request_id, None)
        self._running.pop(request_id, None)

    def has_work(self) -> bool:
        return bool(self._running)

    def step(self) -> list[StepOutput]:
        outs = []
        for rid, state in list(self._running.items()):
            state[0], state[1] = (state[0] + 1) % VOCAB, state[1] - 1
            finish = FinishReason.LENGTH if state[1] <= 0 else None
            if finish:
                del self._running[rid]
            outs.append(StepOutput(rid, [state[0]], [], finish))
        return outs


async def _no_pull(handle: KVHandle, blocks: list[int], timeout: float) -> None:
    return None


async def _no_release(prefill_address: str, request_id: str) -> None:
    return None


def add_null_engine_decode(server: grpc.aio.Server) -> AsyncEngine:
    """Registers the real DecodeService, driven by a NullEngine thread, on `server`."""
    engine = AsyncEngine(NullEngine(), asyncio.get_running_loop())  # type: ignore[arg-type]
    service = DecodeService(engine, _no_pull, _no_release, transfer_timeout=10.0, admission_wait=1.0)
    worker_pb2_grpc.add_DecodeWorkerServicer_to_server(service, server)
    return engine
