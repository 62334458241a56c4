"""Turns a scheduler plan into model inputs, runs the forward pass, samples.

Under tensor parallelism rank 0 owns the runner: it sends each step's inputs to the other ranks
(``engine.distributed.StepBroadcaster``) before its own forward; the all-reduces happen inside the
model. Sampling happens on rank 0 only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch

from engine.attention import AttnMetadata
from engine.sampling import sample
from engine.scheduler import StepPlan

if TYPE_CHECKING:
    from engine.model import LlamaModel


@dataclass(slots=True)
class StepInputs:
    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    meta: AttnMetadata


class StepSender(Protocol):
    def send(self, inputs: StepInputs) -> None: ...


def prepare_inputs(plan: StepPlan, block_size: int, device: torch.device) -> StepInputs:
    """Concatenate every scheduled sequence's new tokens (decode tokens first, as planned)."""
    input_ids: list[int] = []
    positions: list[int] = []
    slots: list[int] = []
    for s in plan.seqs:
        table = s.request.block_table
        pos = range(s.start, s.start + s.num_new_tokens)
        input_ids.extend(s.request.token_ids(s.start, s.start + s.num_new_tokens))
        positions.extend(pos)
        slots.extend(table[p // block_size] * block_size + p % block_size for p in pos)
    width = max(len(s.request.block_table) for s in plan.seqs)
    tables = [s.request.block_table + [0] * (width - len(s.request.block_table)) for s in plan.seqs]
    meta = AttnMetadata(
        query_lens=[s.num_new_tokens for s in plan.seqs],
        seq_lens=[s.start + s.num_new_tokens for s in plan.seqs],
        block_tables=torch.tensor(tables, dtype=torch.int64, device=device),  # [B, max_blocks]
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),  # [T]
    )
    ids = torch.tensor(input_ids, dtype=torch.int64, device=device)  # [T]
    pos_t = torch.tensor(positions, dtype=torch.int64, device=device)  # [T]
    return StepInputs(ids, pos_t, meta)


class ModelRunner:
    def __init__(
        self,
        model: LlamaModel,
        kv: torch.Tensor,
        block_size: int,
        sender: StepSender | None = None,
    ) -> None:
        self.model = model
        self.kv = kv
        self.block_size = block_size
        self.device = kv.device
        self.sender = sender
        self.last_num_tokens = 0  # tokens in the most recent forward (for tests and metrics)

    @torch.inference_mode()
    def run(self, plan: StepPlan) -> tuple[list[int], list[float]]:
        """Forward the plan; returns (token, logprob) for each sequence whose chunk ends its context."""
        inputs = prepare_inputs(plan, self.block_size, self.device)
        self.last_num_tokens = inputs.input_ids.numel()
        if self.sender is not None:
            self.sender.send(inputs)
        hidden = self.model(inputs.input_ids, inputs.positions, inputs.meta, self.kv)  # [T, D]
        ends = torch.tensor(inputs.meta.query_lens).cumsum(0) - 1  # [B] last row of each sequence
        sampling = [i for i, s in enumerate(plan.seqs) if s.samples]
        if not sampling:
            return [], []
        rows = ends[sampling].to(self.device)
        logits = self.model.compute_logits(hidden[rows])  # [N, vocab] fp32
        reqs = [plan.seqs[i].request for i in sampling]
        tokens, logprobs = sample(logits, [r.params for r in reqs], [r.generator for r in reqs])
        return tokens.tolist(), logprobs.tolist()
