"""The benchmark's frozen configuration (built by benchmarks/loadgen/cli.py from the command line)."""

from __future__ import annotations

import math
from dataclasses import dataclass

DATASETS = ("fixed", "uniform", "mixed")
ENDPOINTS = ("grpc", "openai")


@dataclass(frozen=True, slots=True)
class DatasetConfig:
    """Prompt / output lengths in tokens.

    fixed:   every request has input_len prompt tokens and output_len completion tokens.
    uniform: lengths drawn uniformly from [len * (1 - range_ratio), len * (1 + range_ratio)].
    mixed:   a `long_fraction` share of long-prompt/short-answer requests (input_len, short_len),
             the rest short-prompt/long-answer (short_len, output_len); lengths jittered as uniform.
    """

    kind: str = "uniform"
    input_len: int = 128
    output_len: int = 64
    short_len: int = 8
    range_ratio: float = 0.5
    long_fraction: float = 0.5
    vocab_size: int = 256
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in DATASETS:
            raise ValueError(f"--dataset must be one of {', '.join(DATASETS)}, got {self.kind!r}")
        for name in ("input_len", "output_len", "short_len", "vocab_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
        if not 0.0 <= self.range_ratio < 1.0:
            raise ValueError("--range-ratio must be in [0, 1)")
        if not 0.0 <= self.long_fraction <= 1.0:
            raise ValueError("--long-fraction must be in [0, 1]")


@dataclass(frozen=True, slots=True)
class Load:
    """One run's load: Poisson arrivals at `rate` req/s (inf = all at once), capped at
    `concurrency` requests in flight (None = no cap). A fixed-concurrency run has rate inf."""

    rate: float = math.inf
    concurrency: int | None = None

    def __post_init__(self) -> None:
        if not self.rate > 0:
            raise ValueError("--request-rate must be > 0")
        if self.concurrency is not None and self.concurrency < 1:
            raise ValueError("--concurrency must be >= 1")

    @property
    def label(self) -> str:
        if math.isinf(self.rate):
            return f"concurrency {self.concurrency}" if self.concurrency else "all at once"
        cap = f", max {self.concurrency} in flight" if self.concurrency else ""
        return f"{self.rate:.3g} req/s{cap}"


@dataclass(frozen=True, slots=True)
class SLO:
    """A request is 'good' when each set bound holds (None = no bound on that metric)."""

    ttft_ms: float | None = None
    tpot_ms: float | None = None


@dataclass(frozen=True, slots=True)
class BenchConfig:
    address: str
    loads: tuple[Load, ...]
    dataset: DatasetConfig
    num_requests: int = 100
    warmup: int = 0
    slo: SLO = SLO()
    timeout_s: float = 600.0
    api_key: str | None = None
    root_ca: str | None = None
    seed: int = 0
    progress: bool = True
    endpoint: str = "grpc"  # "grpc": Router.Generate; "openai": POST /v1/completions (SSE)

    def __post_init__(self) -> None:
        if self.endpoint not in ENDPOINTS:
            raise ValueError(f"--endpoint must be one of {', '.join(ENDPOINTS)}, got {self.endpoint!r}")
        if self.num_requests < 1:
            raise ValueError("--num-requests must be >= 1")
        if self.warmup < 0:
            raise ValueError("--warmup must be >= 0")
        if not self.loads:
            raise ValueError("at least one load (--concurrency or --request-rate) is needed")
