"""Tensor parallelism as a pass on a built model (Megatron sharding, gpt-fast style).

Column-parallel q/k/v and gate/up (output features split: whole heads per rank), row-parallel
o/down (input features split) followed by an all-reduce over `tp.group`. Embeddings, norms and
lm_head stay replicated (simplest; vocab is small next to the layers).

Works on a materialised model (slices the weights) and on a meta-device model (only shrinks
the shapes; `engine.loader` then reads exactly this rank's slices from the checkpoint).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from engine.config import CheckpointError, ModelConfig

if TYPE_CHECKING:
    from engine.model import LlamaModel

COLUMN_PARALLEL = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
ROW_PARALLEL = ("o_proj", "down_proj")


@dataclass(frozen=True, slots=True)
class TPInfo:
    rank: int
    world_size: int
    group: Any  # torch.distributed ProcessGroup (gloo on CPU, nccl on GPU)


def shard_dim(param_name: str) -> int | None:
    """Dimension a parameter is split on under TP ("layers.0.self_attn.q_proj.weight" -> 0)."""
    parts = param_name.split(".")
    if len(parts) < 2:
        return None
    module, leaf = parts[-2], parts[-1]
    if module in COLUMN_PARALLEL:
        return 0
    if module in ROW_PARALLEL and leaf == "weight":
        return 1
    return None


def check_tp(cfg: ModelConfig, world_size: int) -> None:
    """Raise CheckpointError when the model cannot be split `world_size` ways."""
    for name, value in (
        ("num_key_value_heads", cfg.num_kv_heads),
        ("num_attention_heads", cfg.num_heads),
        ("intermediate_size", cfg.intermediate_size),
    ):
        if value % world_size:
            raise CheckpointError(
                f"config.json: field '{name}' = {value} is not divisible by "
                f"tensor_parallel_size = {world_size}"
            )


def _shard(t: torch.Tensor, dim: int, tp: TPInfo) -> torch.Tensor:
    size = t.shape[dim] // tp.world_size
    part = t.narrow(dim, tp.rank * size, size)
    return part if t.is_meta else part.clone()


def _shard_linear(linear: nn.Linear, dim: int, tp: TPInfo) -> None:
    weight = _shard(linear.weight.data, dim, tp)
    linear.weight = nn.Parameter(weight, requires_grad=False)
    if linear.bias is not None and dim == 0:
        linear.bias = nn.Parameter(_shard(linear.bias.data, 0, tp), requires_grad=False)
    linear.out_features, linear.in_features = weight.shape


def apply_tp(model: LlamaModel, tp: TPInfo) -> LlamaModel:
    """Shard every decoder layer for rank `tp.rank` of `tp.world_size`; returns the same model."""
    check_tp(model.config, tp.world_size)
    if tp.world_size == 1:
        return model
    for layer in model.decoder_layers():
        attn, mlp = layer.self_attn, layer.mlp
        for name in COLUMN_PARALLEL:
            owner = attn if name.endswith(("q_proj", "k_proj", "v_proj")) else mlp
            _shard_linear(getattr(owner, name), 0, tp)
        _shard_linear(attn.o_proj, 1, tp)
        _shard_linear(mlp.down_proj, 1, tp)
        attn.num_heads //= tp.world_size
        attn.num_kv_heads //= tp.world_size
        attn.tp_size = mlp.tp_size = tp.world_size
        attn.tp_group = mlp.tp_group = tp.group
    return model
