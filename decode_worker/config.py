"""What one decode replica needs to know; built by deploy/ from the YAML."""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.config import EngineConfig


@dataclass(frozen=True, slots=True)
class DecodeWorkerConfig:
    engine: EngineConfig  # what rank 0 builds and every rank loads (model, dtype, quantization, KV)
    tensor_parallel_size: int = 1
    torch_threads: int = 1
    host: str = "127.0.0.1"  # the interface this replica's gRPC server binds to
    registry_address: str = ""
    heartbeat_seconds: float = field(kw_only=True)  # deploy/ passes the router's period
    kv_backend: str = "ucx"
    kv_same_host_read: bool = True  # ucx: copy from a same-host prefill rank's mapped pool
    transfer_timeout_seconds: float = 10.0
    admission_wait_seconds: float = 5.0  # how long a request may wait for free KV blocks
    replica_id: str = ""
    rank_num_cpus: float = 0.5  # Ray resources of each follower rank (bundle 1..N-1)
    rank_num_gpus: float = 0.0
    cpu_affinity: tuple[int, ...] = ()  # cores this replica's process is pinned to; () = not pinned
