"""What one prefill replica needs to know; built by deploy/ from the YAML."""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.config import EngineConfig


@dataclass(frozen=True, slots=True)
class PrefillWorkerConfig:
    engine: EngineConfig  # what rank 0 builds and every rank loads (model, dtype, KV blocks, chunk)
    tensor_parallel_size: int = 1
    torch_threads: int = 1
    host: str = "127.0.0.1"  # the interface this replica's gRPC server and KV sources bind to
    registry_address: str = ""  # the router's Registry service, "host:port"
    heartbeat_seconds: float = field(kw_only=True)  # deploy/ passes the router's period
    lease_seconds: float = 30.0
    kv_backend: str = "ucx"
    replica_id: str = ""  # empty: derived from the Ray actor id
    rank_num_cpus: float = 0.5  # Ray resources of each follower rank (bundle 1..N-1)
    rank_num_gpus: float = 0.0
    cpu_affinity: tuple[int, ...] = ()  # cores every rank's process is pinned to; () = not pinned
