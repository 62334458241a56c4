"""What one prefill replica needs to know; built by deploy/ from the YAML."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class PrefillWorkerConfig:
    model_path: str
    dtype: str = "float32"
    tensor_parallel_size: int = 1
    block_size: int = 16
    num_kv_blocks: int = 1024
    max_num_batched_tokens: int = 512
    max_num_seqs: int = 64
    torch_threads: int = 1
    device: str = "cpu"
    host: str = "127.0.0.1"  # the interface this replica's gRPC server and KV sources bind to
    registry_address: str = ""  # the router's Registry service, "host:port"
    heartbeat_seconds: float = 0.5
    lease_seconds: float = 30.0
    kv_backend: str = "ucx"
    replica_id: str = ""  # empty: derived from the Ray actor id
    rank_num_cpus: float = 0.5  # Ray resources of each follower rank (bundle 1..N-1)
    rank_num_gpus: float = 0.0
    cpu_affinity: tuple[int, ...] = ()  # cores every rank's process is pinned to; () = not pinned
