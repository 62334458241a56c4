"""pdserve's deploy schema: every YAML key as a field of a frozen dataclass.

Each field's type hint is its type rule and its metadata the doc line and range (see
deploy/validator.py, which walks them; deploy/config.py loads and cross-checks a file). Defaults
that a runtime config also has (the engine's block size, chunk and batch sizes, the router's ports,
limits and heartbeat, the KV lease and pull timeout) are taken from that config, not written again.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from decode_worker.config import DecodeWorkerConfig
from deploy.validator import FloatMap, default_of, opt, section
from deploy.yaml_io import to_plain
from engine.config import DEFAULT_MODEL_DIR, EngineConfig
from prefill_worker.config import PrefillWorkerConfig
from router.config import RouterConfig

Dtype = Literal["float32", "bfloat16", "float16"]
Device = Literal["cpu", "cuda"]
TPSize = Literal[1, 2, 4, 8]
Quantization = Literal["none", "int8", "fp8"]
Backend = Literal["ucx", "torch"]
ServingMode = Literal["disaggregated", "colocated"]


def _engine(name: str) -> Any:
    return default_of(EngineConfig, name)


def _router(name: str) -> Any:
    return default_of(RouterConfig, name)


@dataclass(frozen=True, slots=True)
class ModelSection:
    path: str = opt(DEFAULT_MODEL_DIR, "Hugging Face model directory (config.json, *.safetensors, "
                    "tokenizer.json); a relative path is relative to the YAML file",
                    nonempty=True, shown="`engine/default_model` (bundled tiny model)")
    dtype: Dtype = opt(_engine("dtype"), "weights, activations and KV cache dtype of both pools")
    block_size: int = opt(_engine("block_size"), "tokens per KV block, shared by both pools",
                          ge=1, le=1024)
    max_model_len: int | None = opt(None, "longest prompt + completion accepted, in tokens",
                                    ge=1, shown="model's `max_position_embeddings`")
    name: str | None = opt(None, "the served model's id: the `model` of OpenAI requests and what "
                           "`GET /v1/models` lists", nonempty=True,
                           shown="the name of the `model.path` directory")

    @property
    def served_name(self) -> str:
        return self.name or Path(self.path).name


@dataclass(frozen=True, slots=True)
class TLSSection:
    cert: str | None = opt(None, "PEM server certificate chain; enables TLS (needs `key`)")
    key: str | None = opt(None, "PEM private key of `cert`")
    client_ca: str | None = opt(None, "PEM CA bundle; when set, clients must present a cert it signed")


@dataclass(frozen=True, slots=True)
class HttpSection:
    port: int | None = opt(8000, "OpenAI-compatible HTTP port (`/v1/completions`, "
                           "`/v1/chat/completions`, `/v1/models`, `/health`) on `router.host`, "
                           "with the gRPC port's TLS and API keys (0 = pick a free port); "
                           "null = off", ge=0, le=65535)


@dataclass(frozen=True, slots=True)
class RouterSection:
    host: str = opt(_router("host"), "interface the public gRPC and HTTP servers bind to",
                    nonempty=True)
    port: int = opt(_router("port"), "public gRPC port (0 = pick a free one)", ge=0, le=65535)
    internal_host: str = opt(_router("internal_host"), "interface of the internal registry server "
                             "workers heartbeat to (`auto` = this node's IP as Ray reports it)",
                             nonempty=True)
    max_inflight: int = opt(_router("max_inflight"), "requests admitted at once; more get "
                            "RESOURCE_EXHAUSTED", ge=1)
    max_queued_prompt_tokens: int = opt(_router("max_queued_prompt_tokens"), "prompt tokens "
                                        "waiting for prefill before admission refuses new "
                                        "requests", ge=1)
    default_max_tokens: int = opt(_router("default_max_tokens"), "`max_tokens` of a request that "
                                  "sets none", ge=1)
    heartbeat_seconds: float = opt(_router("heartbeat_seconds"), "replica heartbeat period; a "
                                   "replica silent for 3 periods is forgotten", gt=0)
    api_keys: tuple[str, ...] = opt(_router("api_keys"), "accepted `authorization: Bearer <key>` "
                                    "values; empty = no auth")
    tls: TLSSection = section(TLSSection, "TLS for the public ports (all null = plaintext)")
    http: HttpSection = section(HttpSection, "the OpenAI-compatible HTTP door into the same "
                               "request flow")
    metrics_port: int | None = opt(None, "Prometheus `/metrics` over HTTP on `host` (TTFT/TPOT/ITL "
                                   "histograms, queues, KV use, KV transfers; 0 = pick a free "
                                   "port); null = off", ge=0, le=65535)
    migration: bool = opt(_router("migration"), "a decode replica that dies mid-stream: prefill "
                          "the prompt + the tokens already sent again and continue on another "
                          "replica (false = the request ends UNAVAILABLE)")


@dataclass(frozen=True, slots=True)
class ResourcesSection:
    num_cpus: float = opt(0.5, "Ray CPUs per rank", ge=0)
    num_gpus: float = opt(0.0, "Ray GPUs per rank (use 1 with `device: cuda`)", ge=0)
    custom: FloatMap = opt((), "Ray custom resources per rank, e.g. `{prefill_node: 0.01}` to "
                           "pin the pool to nodes started with that resource", ge=0)

    def ray_resources(self) -> dict[str, float]:
        """`custom` as the dict Ray's `resources=` option takes."""
        return dict(self.custom)


@dataclass(frozen=True, slots=True)
class PrefillAutoscaling:
    min_replicas: int = opt(1, "fewest replicas", ge=0)
    max_replicas: int = opt(4, "most replicas", ge=1)
    target: int = opt(2048, "queued prompt tokens per replica the policy aims for", ge=1)
    upscale_delay_s: float = opt(5.0, "load must stay high this long before adding a replica", ge=0)
    downscale_delay_s: float = opt(30.0, "load must stay low this long before removing one", ge=0)


@dataclass(frozen=True, slots=True)
class DecodeAutoscaling:
    min_replicas: int = opt(1, "fewest replicas", ge=0)
    max_replicas: int = opt(4, "most replicas", ge=1)
    target: float = opt(0.7, "fraction of KV blocks in use per replica the policy aims for",
                        gt=0, le=1)
    upscale_delay_s: float = opt(5.0, "load must stay high this long before adding a replica", ge=0)
    downscale_delay_s: float = opt(30.0, "load must stay low this long before removing one", ge=0)


@dataclass(frozen=True, slots=True)
class PrefillSection:
    tensor_parallel_size: TPSize = opt(2, "ranks (processes) per prefill replica")
    replicas: int = opt(1, "replicas at start", ge=1)
    num_kv_blocks: int = opt(1024, "KV blocks per rank", ge=1)
    max_num_batched_tokens: int = opt(_engine("max_num_batched_tokens"), "prompt tokens per "
                                      "forward step (chunked prefill)", ge=1)
    torch_threads: int = opt(1, "`torch.set_num_threads` per rank", ge=1)
    device: Device = opt(_engine("device"), "where the ranks run")
    resources: ResourcesSection = section(ResourcesSection, "Ray resources of each rank")
    autoscaling: PrefillAutoscaling | None = opt(None, "queue-driven autoscaling; null = fixed "
                                                 "`replicas`, `{}` = on with defaults")
    cpu_affinity: tuple[int, ...] = opt((), "CPU cores every rank's process is pinned to "
                                        "(`os.sched_setaffinity`); empty = not pinned", ge=0)


@dataclass(frozen=True, slots=True)
class DecodeSection:
    tensor_parallel_size: TPSize = opt(1, "ranks per decode replica")
    replicas: int = opt(1, "replicas at start", ge=1)
    quantization: Quantization = opt(_engine("quantization"), "decode weights: `int8` weight-only "
                                     "(CPU or GPU), `fp8` (Hopper/Ada GPU only)")
    num_kv_blocks: int = opt(2048, "KV blocks per rank", ge=1)
    max_num_seqs: int = opt(_engine("max_num_seqs"), "most sequences in the running batch", ge=1)
    torch_threads: int = opt(1, "`torch.set_num_threads` per rank", ge=1)
    device: Device = opt(_engine("device"), "where the ranks run")
    resources: ResourcesSection = section(ResourcesSection, "Ray resources of each rank")
    autoscaling: DecodeAutoscaling | None = opt(None, "KV-use-driven autoscaling; null = fixed "
                                                "`replicas`, `{}` = on with defaults")
    cpu_affinity: tuple[int, ...] = opt((), "CPU cores every replica's process is pinned to "
                                        "(`os.sched_setaffinity`); empty = not pinned", ge=0)
    local_prefill_max_tokens: int = opt(0, "conditional disaggregation: a prompt with at most this "
                                        "many tokens not already cached on the chosen decode "
                                        "replica is prefilled there (no KV transfer); 0 = off",
                                        ge=0)


@dataclass(frozen=True, slots=True)
class KVTransferSection:
    backend: Backend = opt("ucx", "`ucx` (ucxx: shm/tcp/cuda_ipc/RDMA) or `torch` "
                           "(torch.distributed: gloo on CPU, NCCL on GPU)")
    lease_seconds: float = opt(default_of(PrefillWorkerConfig, "lease_seconds"), "prefill keeps a "
                               "request's KV blocks this long for the pull", gt=0)
    timeout_seconds: float = opt(default_of(DecodeWorkerConfig, "transfer_timeout_seconds"),
                                 "decode gives up on a pull after this long", gt=0)
    streaming: bool = opt(False, "chunk-wise KV streaming: decode pulls each prefill chunk's KV "
                          "while the next chunk is computed (`prefill.max_num_batched_tokens` "
                          "per pull), hiding the transfer behind prefill")
    same_host_read: bool = opt(default_of(DecodeWorkerConfig, "kv_same_host_read"), "ucx, CPU "
                               "caches: a decode rank on the prefill rank's host copies the "
                               "blocks out of the prefill's KV pool itself (a memfd it maps "
                               "read-only through /proc; same user and pid namespace), one "
                               "memcpy instead of the UCX payload; falls back to the payload "
                               "where it cannot map the pool")
    host: str = opt("127.0.0.1", "interface KV sources bind to (`auto` = this node's IP as Ray "
                    "reports it; needed across nodes)", nonempty=True)


@dataclass(frozen=True, slots=True)
class RaySection:
    address: str | None = opt(None, "Ray cluster to join (`auto`, `ray://head:10001`); "
                              "null = start a local Ray", nonempty=True)
    namespace: str = opt("pdserve", "Ray namespace of the Serve application", nonempty=True)


@dataclass(frozen=True, slots=True)
class DeployConfig:
    serving_mode: ServingMode = opt("disaggregated", "`disaggregated`: a prefill pool and a decode "
                                    "pool, KV moved between them; `colocated`: no prefill pool, "
                                    "each `decode` replica runs both phases on one engine (like a "
                                    "plain vLLM server; chunk size from "
                                    "`prefill.max_num_batched_tokens`)")
    model: ModelSection = section(ModelSection, "the model both pools serve")
    router: RouterSection = section(RouterSection, "the public router: gRPC and OpenAI HTTP")
    prefill: PrefillSection = section(PrefillSection, "the prefill pool")
    decode: DecodeSection = section(DecodeSection, "the decode pool")
    kv_transfer: KVTransferSection = section(KVTransferSection, "moving KV blocks prefill -> decode")
    ray: RaySection = section(RaySection, "the Ray cluster")

    def to_dict(self) -> dict[str, Any]:
        """Plain YAML-able data; `parse_config(cfg.to_dict(), ...) == cfg`."""
        return typing.cast(dict[str, Any], to_plain(self, DeployConfig))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)
