"""Seeded synthetic requests: prompt token ids and output lengths (see DatasetConfig)."""

from __future__ import annotations

import random
from dataclasses import dataclass

from benchmarks.loadgen.config import DatasetConfig

FIRST_ID = 1  # prompts avoid token 0 (often a special / EOS id)


@dataclass(frozen=True, slots=True)
class RequestSpec:
    prompt_ids: tuple[int, ...]
    max_tokens: int
    kind: str = ""  # mixed: "long_prompt" | "long_answer"


def _jitter(rng: random.Random, n: int, ratio: float) -> int:
    low, high = max(1, round(n * (1 - ratio))), max(1, round(n * (1 + ratio)))
    return rng.randint(low, high)


def _lengths(cfg: DatasetConfig, rng: random.Random) -> tuple[int, int, str]:
    if cfg.kind == "fixed":
        return cfg.input_len, cfg.output_len, ""
    if cfg.kind == "uniform":
        return _jitter(rng, cfg.input_len, cfg.range_ratio), _jitter(rng, cfg.output_len, cfg.range_ratio), ""
    if rng.random() < cfg.long_fraction:
        return _jitter(rng, cfg.input_len, cfg.range_ratio), _jitter(rng, cfg.short_len, cfg.range_ratio), "long_prompt"
    return _jitter(rng, cfg.short_len, cfg.range_ratio), _jitter(rng, cfg.output_len, cfg.range_ratio), "long_answer"


def make_requests(cfg: DatasetConfig, n: int, seed_offset: int = 0) -> list[RequestSpec]:
    """`n` requests; the same (cfg, n, seed_offset) always gives the same list. Lengths depend on
    cfg.seed only; token ids also on seed_offset (fresh prompts per run, same length mix)."""
    lengths = random.Random(cfg.seed)
    tokens = random.Random(cfg.seed * 1_000_003 + seed_offset + 1)
    high = max(FIRST_ID, cfg.vocab_size - 1)
    specs = []
    for _ in range(n):
        prompt_len, out_len, kind = _lengths(cfg, lengths)
        prompt = tuple(tokens.randint(FIRST_ID, high) for _ in range(prompt_len))
        specs.append(RequestSpec(prompt, out_len, kind))
    return specs
