"""One decode replica: a (optionally quantized) engine, a KV puller and the DecodeWorker service.

Lifecycle:
  1. `start()` builds the engine (quantized layer by layer while loading), the KV puller over its
     cache, and starts the gRPC service on `cfg.host` (ephemeral port).
  2. Requests flow through `DecodeService` (decode_worker/server.py).
  3. `status()` feeds the heartbeat; `stop()` stops the service, the engine thread and the puller.
"""

from __future__ import annotations

import asyncio

import grpc
import torch
from pdserve.v1 import worker_pb2, worker_pb2_grpc

from decode_worker.config import DecodeWorkerConfig
from decode_worker.server import DecodeService
from engine.async_engine import AsyncEngine
from engine.engine import EngineConfig, LLMEngine
from engine.kv_cache import CacheConfig
from engine.quant import weight_bytes
from kv_transfer import make_puller
from kv_transfer.base import KVPuller
from kv_transfer.handle import KVHandle


class DecodeReplica:
    def __init__(self, cfg: DecodeWorkerConfig) -> None:
        if cfg.tensor_parallel_size != 1:
            raise ValueError("decode.tensor_parallel_size > 1 is not supported by the decode replica yet")
        torch.set_num_threads(cfg.torch_threads)
        self.cfg = cfg
        self.engine: AsyncEngine | None = None
        self.puller: KVPuller | None = None
        self.server: grpc.aio.Server | None = None
        self.channels: dict[str, grpc.aio.Channel] = {}
        self.address = ""

    async def start(self) -> str:
        llm = await asyncio.to_thread(self._build_engine)
        self.engine = AsyncEngine(llm, asyncio.get_running_loop())
        self.puller = make_puller(self.cfg.kv_backend, llm.kv, 0, 1, llm.model_config.num_kv_heads)
        service = DecodeService(
            self.engine, self._pull, self._release, self.cfg.transfer_timeout_seconds,
            self.cfg.admission_wait_seconds,
        )
        self.server = grpc.aio.server()
        worker_pb2_grpc.add_DecodeWorkerServicer_to_server(service, self.server)
        port = self.server.add_insecure_port(f"{self.cfg.host}:0")
        await self.server.start()
        self.address = f"{self.cfg.host}:{port}"
        return self.address

    def _build_engine(self) -> LLMEngine:
        config = EngineConfig(
            model=self.cfg.model_path,
            dtype=self.cfg.dtype,
            block_size=self.cfg.block_size,
            num_blocks=self.cfg.num_kv_blocks,
            max_num_batched_tokens=self.cfg.max_num_batched_tokens,
            max_num_seqs=self.cfg.max_num_seqs,
            quantization=self.cfg.quantization,
            device=self.cfg.device,
        )
        return LLMEngine(config, None, CacheConfig(self.cfg.block_size, self.cfg.num_kv_blocks))

    async def _pull(self, handle: KVHandle, blocks: list[int], timeout: float) -> None:
        assert self.puller is not None
        await self.puller.pull(handle, blocks, timeout)

    async def _release(self, prefill_address: str, request_id: str) -> None:
        """Tells the prefill replica to free its lease; failures only shorten nothing (the lease expires)."""
        if not prefill_address:
            return
        channel = self.channels.get(prefill_address)
        if channel is None:
            channel = self.channels[prefill_address] = grpc.aio.insecure_channel(prefill_address)
        try:
            stub = worker_pb2_grpc.PrefillWorkerStub(channel)
            await stub.ReleaseKV(worker_pb2.ReleaseKVRequest(request_id=request_id), timeout=5.0)
        except grpc.aio.AioRpcError:
            pass

    def status(self, replica_id: str) -> worker_pb2.WorkerStatus:
        ready = self.engine is not None and self.engine.error is None and self.address != ""
        st = worker_pb2.WorkerStatus(
            replica_id=replica_id, role=worker_pb2.WorkerStatus.DECODE, address=self.address, ready=ready,
            tp_size=1, block_size=self.cfg.block_size, kv_dtype=self.cfg.dtype,
            quantization=self.cfg.quantization,
        )
        if self.engine is not None:
            llm = self.engine.engine
            st.running, st.queued = llm.num_running, llm.num_waiting
            st.kv_blocks_total, st.kv_blocks_free = llm.num_total_blocks, llm.num_free_blocks
            st.weight_bytes = weight_bytes(llm.model)
        return st

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.stop(grace=1.0)
        if self.engine is not None:
            self.engine.close()
        if self.puller is not None:
            await self.puller.close()
        for channel in self.channels.values():
            await channel.close()

