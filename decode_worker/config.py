"""What one decode replica needs to know; built by deploy/ from the YAML."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class DecodeWorkerConfig:
    model_path: str
    dtype: str = "float32"
    quantization: str = "none"
    tensor_parallel_size: int = 1
    block_size: int = 16
    num_kv_blocks: int = 2048
    max_num_batched_tokens: int = 512
    max_num_seqs: int = 64
    torch_threads: int = 1
    device: str = "cpu"
    host: str = "127.0.0.1"  # the interface this replica's gRPC server binds to
    registry_address: str = ""
    heartbeat_seconds: float = 0.5
    kv_backend: str = "ucx"
    kv_same_host_read: bool = True  # ucx: copy from a same-host prefill rank's mapped pool
    transfer_timeout_seconds: float = 10.0
    admission_wait_seconds: float = 5.0  # how long a request may wait for free KV blocks
    replica_id: str = ""
    rank_num_cpus: float = 0.5  # Ray resources of each follower rank (bundle 1..N-1)
    rank_num_gpus: float = 0.0
    cpu_affinity: tuple[int, ...] = ()  # cores this replica's process is pinned to; () = not pinned
