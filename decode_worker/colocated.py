"""A colocated replica: ONE engine runs both phases, like a plain vLLM server.

Used for `serving_mode: colocated` (the replica is both a PREFILL and a DECODE replica) and for
conditional disaggregation (`decode.local_prefill_max_tokens`: a decode replica that also prefills
the prompts the router keeps local). It is a decode replica that also serves prefill_worker's
PrefillService on its own engine.

Lifecycle:
  1. `start()` builds the engine as a decode replica does and serves PrefillWorker and DecodeWorker
     on one gRPC server.
  2. `Prefill` (prefill_worker's PrefillService) runs the prompt with hold_kv and leases the blocks in
     place: the KVHandle's one shard names `local://<token>` instead of a KV source.
  3. `Decode` of such a handle adopts the held blocks (`AsyncEngine.adopt`): no copy, no transfer. Any
     other handle is pulled, as on a plain decode replica.
  4. The lease expires (blocks freed) if no Decode comes; ReleaseKV frees it at once.
"""

from __future__ import annotations

import asyncio
import secrets
from dataclasses import dataclass

import grpc
from pdserve.v1 import worker_pb2, worker_pb2_grpc
from pdserve.v1.kv_endpoints import LOCAL_KV_SCHEME

from decode_worker.config import DecodeWorkerConfig
from decode_worker.replica import DecodeReplica
from decode_worker.server import DecodeService, Pull, Release, abort_call
from engine.async_engine import AsyncEngine, RequestStream
from engine.config import load_config
from engine.distributed import GroupSpec
from engine.engine import resolve_cache_config
from engine.sampling import SamplingParams
from kv_transfer import make_puller
from kv_transfer.handle import KVHandle
from prefill_worker.server import PrefillService, RankLease

MAX_REPORTED_HASHES = 512  # prefix-block hashes per heartbeat (router: affinity, local prefill)
PULL_FIELDS = ("kv_pulls", "kv_pull_bytes", "kv_pull_seconds", "kv_pull_latency_bounds",
               "kv_pull_latency_counts")


@dataclass(frozen=True, slots=True)
class ColocatedWorkerConfig:
    decode: DecodeWorkerConfig  # the engine (max_num_batched_tokens = the prefill chunk), KV, pulls
    lease_seconds: float  # a held prompt's blocks are freed if no Decode adopts them by then
    announce_prefill: bool = True  # also heartbeat as a PREFILL replica (serving_mode: colocated)


@dataclass(slots=True)
class LocalStats:
    """Cumulative counts of this replica's two decode paths."""

    adopted: int = 0  # decodes that adopted a local prefill's blocks
    pulled: int = 0   # decodes whose KV came from a prefill replica


def _in_place(endpoint: str) -> RankLease:
    """A 'rank' whose lease is the engine's held blocks themselves: nothing to register."""

    async def lease(rid: str, blocks: list[int], expiry: float, token: bytes) -> None:
        return None

    async def unlease(rid: str) -> None:
        return None

    return RankLease(0, endpoint, lease, unlease)


class ColocatedDecodeService(DecodeService):
    """DecodeService that adopts the KV of prompts prefilled by this replica's own engine."""

    def __init__(self, prefill: PrefillService, endpoint: str, stats: LocalStats, engine: AsyncEngine,
                 pull: Pull, release: Release, transfer_timeout: float, admission_wait: float) -> None:
        super().__init__(engine, pull, release, transfer_timeout, admission_wait)
        self.prefill, self.endpoint, self.stats = prefill, endpoint, stats

    def owns(self, handle: KVHandle) -> bool:
        return bool(handle.shards) and all(s.endpoint == self.endpoint for s in handle.shards)

    def take_lease(self, rid: str) -> bool:
        """The held blocks pass from the prefill lease to this decode; False if already gone."""
        return self.prefill.leases.adopt(rid)

    async def _admit_and_pull(self, request: worker_pb2.DecodeRequest, params: SamplingParams,
                              handle: KVHandle, context: grpc.aio.ServicerContext) -> RequestStream:
        if not self.owns(handle):
            stream = await super()._admit_and_pull(request, params, handle, context)
            self.stats.pulled += 1
            return stream
        rid = request.request_id
        if not self.take_lease(rid):
            await abort_call(context, grpc.StatusCode.UNAVAILABLE,
                             f"the KV of {rid} is no longer held here (lease expired or released)")
        stream = self.engine.open_stream(rid)
        try:
            await self.engine.adopt(rid, params)
        except (KeyError, ValueError) as exc:
            await abort_call(context, grpc.StatusCode.UNAVAILABLE, f"adopting the KV of {rid}: {exc}")
        self.stats.adopted += 1
        return stream


class ColocatedReplica(DecodeReplica):
    """A decode replica whose engine also prefills (see the module docstring)."""

    def __init__(self, cfg: ColocatedWorkerConfig) -> None:
        if cfg.decode.tensor_parallel_size != 1:
            raise ValueError("a colocated replica runs tensor_parallel_size 1 only")
        super().__init__(cfg.decode)
        self.colocated = cfg
        self.endpoint = f"{LOCAL_KV_SCHEME}{secrets.token_hex(8)}"
        self.prefill_service: PrefillService | None = None
        self.stats = LocalStats()

    async def start(self) -> str:
        cache = resolve_cache_config(self.cfg.engine, load_config(self.cfg.engine.model), 1)
        llm = await asyncio.to_thread(self._build_engine, GroupSpec("", 1, cache))
        self.engine = engine = AsyncEngine(llm, asyncio.get_running_loop())
        self.puller = make_puller(self.cfg.kv_backend, llm.kv, 0, 1, llm.model_config.num_kv_heads,
                                  same_host_read=self.cfg.kv_same_host_read)
        self.prefill_service = PrefillService(engine, [_in_place(self.endpoint)],
                                              self.colocated.lease_seconds, self.cfg.engine.dtype)
        self.service = ColocatedDecodeService(
            self.prefill_service, self.endpoint, self.stats, engine, self._pull, self._release,
            self.cfg.transfer_timeout_seconds, self.cfg.admission_wait_seconds,
        )
        self.server = grpc.aio.server()
        worker_pb2_grpc.add_PrefillWorkerServicer_to_server(self.prefill_service, self.server)
        worker_pb2_grpc.add_DecodeWorkerServicer_to_server(self.service, self.server)
        port = self.server.add_insecure_port(f"{self.cfg.host}:0")
        await self.server.start()
        self.address = f"{self.cfg.host}:{port}"
        return self.address

    def status(self, replica_id: str) -> worker_pb2.WorkerStatus:
        """The DECODE-role status, with the prefix blocks this engine has cached."""
        st = super().status(replica_id)
        st.prefix_hashes.extend(self._cached_hashes())
        return st

    def prefill_status(self, replica_id: str) -> worker_pb2.WorkerStatus:
        """The same engine seen as a PREFILL replica (its own replica id, the same address)."""
        st = self.status(replica_id)
        st.role = worker_pb2.WorkerStatus.PREFILL
        for name in PULL_FIELDS:
            st.ClearField(name)
        service = self.prefill_service
        if service is not None:
            st.queued_prompt_tokens = service.queued_prompt_tokens
            st.kv_blocks_leased = service.leased_blocks()
        return st

    def idle(self) -> bool:
        prefill, decode = self.prefill_service, self.service
        return (prefill is None or (prefill.queued_prompt_tokens == 0 and not prefill.leases)) and (
            decode is None or not decode.active)

    def _cached_hashes(self) -> list[int]:
        return [] if self.engine is None else self.engine.prefix_hashes(MAX_REPORTED_HASHES)
