"""Sampling parameters and the batched sampler.

Greedy rows (temperature 0) take the argmax. Other rows are scaled by their temperature, restricted
by top-k and top-p, then sampled with the request's own ``torch.Generator`` so a seeded request gives
the same tokens whatever else shares its batch. The reported logprob is that of the sampled token
under the model's raw distribution (``log_softmax`` of the unscaled logits).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

GREEDY_EPS = 1e-5  # temperatures below this sample greedily


@dataclass(frozen=True, slots=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = -1
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: bool = False

    def __post_init__(self) -> None:
        # accept lists from callers, store tuples (frozen + hashable)
        object.__setattr__(self, "stop", _as_tuple(self.stop, "stop", str))
        object.__setattr__(self, "stop_token_ids", _as_tuple(self.stop_token_ids, "stop_token_ids", int))
        if self.max_tokens < 1:
            raise ValueError(f"SamplingParams.max_tokens must be >= 1, got {self.max_tokens}")
        if not self.temperature >= 0.0:
            raise ValueError(f"SamplingParams.temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"SamplingParams.top_p must be in (0, 1], got {self.top_p}")
        if self.top_k == 0 or self.top_k < -1:
            raise ValueError(f"SamplingParams.top_k must be -1 (off) or >= 1, got {self.top_k}")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise ValueError(f"SamplingParams.seed must be in [0, 2**63), got {self.seed}")
        if any(s == "" for s in self.stop):
            raise ValueError("SamplingParams.stop must not contain an empty string")
        if any(t < 0 for t in self.stop_token_ids):
            raise ValueError(f"SamplingParams.stop_token_ids must be >= 0, got {self.stop_token_ids}")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_EPS

    @classmethod
    def from_wire(cls, m: Any) -> SamplingParams:
        """From a protobuf message with WorkerSampling's fields (zero means unset, `seed` is optional).
        Duck-typed: the engine does not import the generated stubs."""
        return cls(
            max_tokens=max(1, m.max_tokens),
            temperature=m.temperature,
            top_p=m.top_p if m.top_p > 0 else 1.0,
            top_k=m.top_k if m.top_k != 0 else -1,
            seed=m.seed if m.HasField("seed") else None,
            stop=tuple(m.stop),
            stop_token_ids=tuple(m.stop_token_ids),
            ignore_eos=m.ignore_eos,
            logprobs=m.logprobs,
        )


def _as_tuple(value: object, name: str, kind: type) -> tuple:
    if isinstance(value, str | bytes) or not isinstance(value, Sequence):
        raise ValueError(f"SamplingParams.{name} must be a list or tuple of {kind.__name__}")
    if not all(isinstance(v, kind) and not isinstance(v, bool) for v in value):
        raise ValueError(f"SamplingParams.{name} must hold only {kind.__name__} values, got {value!r}")
    return tuple(value)


def sample(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample one token per row.

    logits: [N, V] fp32; ``params[i]``/``generators[i]`` belong to row i.
    Returns (token_ids [N] int64, logprobs [N] fp32 of those tokens under the raw distribution;
    0 for rows whose params do not ask for logprobs).
    """
    logits = logits.float()
    tokens = logits.argmax(dim=-1)  # [N]
    random_rows = [i for i, p in enumerate(params) if not p.greedy]
    if random_rows:
        rows = torch.tensor(random_rows, dtype=torch.long, device=logits.device)
        probs = _filtered_probs(logits[rows], [params[i] for i in random_rows])  # [R, V]
        for j, i in enumerate(random_rows):
            tokens[i] = _draw(probs[j], generators[i])
    logprobs = torch.zeros(len(params), dtype=torch.float32, device=logits.device)  # [N]
    want = [i for i, p in enumerate(params) if p.logprobs]
    if want:
        rows = torch.tensor(want, dtype=torch.long, device=logits.device)
        picked = torch.log_softmax(logits[rows], dim=-1).gather(1, tokens[rows, None])  # [W, 1]
        logprobs[rows] = picked.squeeze(1)
    return tokens, logprobs


def _filtered_probs(logits: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """logits: [R, V] -> probabilities [R, V] after temperature, top-k and top-p."""
    dev, vocab = logits.device, logits.shape[-1]
    temps = torch.tensor([p.temperature for p in params], dtype=logits.dtype, device=dev)
    logits = logits / temps[:, None]
    top_k = torch.tensor([p.top_k if 0 < p.top_k < vocab else vocab for p in params], device=dev)
    top_p = torch.tensor([p.top_p for p in params], dtype=logits.dtype, device=dev)
    sorted_logits, order = logits.sort(dim=-1, descending=True)  # [R, V]
    ranks = torch.arange(vocab, device=dev)[None, :]  # [1, V]
    drop = ranks >= top_k[:, None]
    sorted_probs = torch.softmax(sorted_logits.masked_fill(drop, float("-inf")), dim=-1)
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs  # [R, V]
    drop |= (mass_before >= top_p[:, None]) & (top_p[:, None] < 1.0)
    drop[:, 0] = False  # the most likely token always stays
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    filtered = torch.full_like(logits, float("-inf")).scatter(1, order, sorted_logits)
    return torch.softmax(filtered, dim=-1)


def _draw(probs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """probs: [V] -> one token id (0-dim), using only ``generator`` (batch-independent)."""
    return torch.multinomial(probs, 1, generator=generator)[0]
