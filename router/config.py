"""RouterConfig: everything the router reads, filled by deploy/ from YAML (the router never sees YAML).

Its defaults are the YAML's too: deploy/schema.py takes them from here.
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.config import BLOCK_SIZE

DEFAULT_MAX_TOKENS = 256


@dataclass(frozen=True, slots=True)
class RouterConfig:
    """Ports may be 0 (ephemeral); RouterServer reports the bound ports after start()."""

    vocab_size: int                  # the model's vocabulary (token ids must be below it)
    context_len: int                 # prompt + completion tokens must fit
    block_size: int = BLOCK_SIZE     # KV block size of both pools (prefix hashing, block estimates)
    eos_token_ids: tuple[int, ...] = ()
    host: str = "127.0.0.1"          # public Router API, health and reflection
    port: int = 50051
    internal_host: str = "127.0.0.1"  # Registry service (worker heartbeats)
    internal_port: int = 0
    max_inflight: int = 256          # admitted requests not finished
    max_queued_prompt_tokens: int = 65536  # prompt tokens of admitted requests still in prefill
    default_max_tokens: int = DEFAULT_MAX_TOKENS
    heartbeat_seconds: float = 1.0   # a replica silent for 3 x this is forgotten; deploy/ gives
    #   the pools the same period
    affinity_max_imbalance_tokens: int = 2048  # prefix affinity yields to load beyond this gap
    affinity_blocks: int = 8         # leading full prompt blocks hashed for affinity
    worker_retries: int = 2          # extra attempts on other replicas (UNAVAILABLE / RESOURCE_EXHAUSTED)
    migration: bool = True           # a decode replica that dies mid-stream: continue on another one
    release_timeout_seconds: float = 2.0  # ReleaseKV calls after cancel/early finish
    kv_streaming: bool = False       # PrefillStream: decode pulls KV chunks while prefill runs
    local_prefill_max_tokens: int = 0  # prompts with at most this many tokens not cached on the
    #   best decode replica are prefilled there (its engine adopts the KV: no transfer); 0 = off
    api_keys: tuple[str, ...] = ()   # accepted `authorization: Bearer <key>`; empty = no auth
    tls_cert: str | None = None      # PEM certificate chain file: TLS on the public port
    tls_key: str | None = None       # PEM private key file of tls_cert
    tls_client_ca: str | None = None  # PEM CA file: clients must present a certificate it signed
    http_port: int | None = None     # OpenAI-compatible HTTP on `host` (0 = a free port); None = off
    model_name: str = "pdserve"      # the served model's id (HTTP `model`, GET /v1/models)
    chat_template: str | None = None  # Jinja2 chat template (tokenizer_config.json); None = no chat
    chat_tokens: tuple[tuple[str, str], ...] = ()  # special tokens the template sees (bos_token, ...)

    def __post_init__(self) -> None:
        for name in ("vocab_size", "context_len", "block_size", "max_inflight", "default_max_tokens"):
            if getattr(self, name) <= 0:
                raise ValueError(f"RouterConfig.{name} must be > 0, got {getattr(self, name)}")
        if self.heartbeat_seconds <= 0:
            raise ValueError(f"RouterConfig.heartbeat_seconds must be > 0, got {self.heartbeat_seconds}")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("RouterConfig.tls_cert and tls_key must be set together")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("RouterConfig.tls_client_ca needs tls_cert and tls_key")
        for port_name in ("port", "internal_port", "http_port"):
            if not 0 <= (getattr(self, port_name) or 0) <= 65535:
                raise ValueError(f"RouterConfig.{port_name} must be in 0..65535")
