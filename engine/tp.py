"""Tensor parallelism as a pass on a built model (Megatron sharding, gpt-fast style).

Column-parallel q/k/v and gate/up (output features split: whole heads per rank), row-parallel
o/down (input features split) followed by an all-reduce over `tp.group`. Embeddings, norms and
lm_head stay replicated (simplest; vocab is small next to the layers).

KV heads: with tp <= num_kv_heads each rank holds num_kv_heads / tp of them; with more ranks than
KV heads (tp a multiple of num_kv_heads) they are replicated, as in vLLM: rank r holds the one KV
head ``r * num_kv_heads // tp``, which is the head its query heads attend with.

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


def kv_heads_per_rank(num_kv_heads: int, tp_size: int) -> int:
    """KV heads one rank holds (1 when tp_size exceeds num_kv_heads: replicated heads)."""
    return max(1, num_kv_heads // tp_size)


def kv_head_range(num_kv_heads: int, tp_size: int, rank: int) -> range:
    """The global KV heads rank `rank` of `tp_size` holds."""
    start = rank * num_kv_heads // tp_size
    return range(start, start + kv_heads_per_rank(num_kv_heads, tp_size))


def tp_kv_error(num_kv_heads: int, tp_size: int) -> str | None:
    """Why `tp_size` ranks cannot share `num_kv_heads` KV heads, or None when they can."""
    if num_kv_heads % tp_size == 0 or tp_size % num_kv_heads == 0:
        return None
    return (f"{tp_size} ranks cannot share {num_kv_heads} KV heads: the KV heads must be divisible "
            f"by tensor_parallel_size, or tensor_parallel_size by the KV heads (replicated heads)")


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


def shard_range(param_name: str, size: int, cfg: ModelConfig, tp: TPInfo) -> tuple[int, int]:
    """(start, length) of this rank's slice along the parameter's shard dim of full `size`:
    k/v projections take the rank's KV heads (replicated past num_kv_heads), the rest an even split."""
    module = param_name.split(".")[-2] if "." in param_name else ""
    if module in ("k_proj", "v_proj"):
        heads = kv_head_range(cfg.num_kv_heads, tp.world_size, tp.rank)
        return heads.start * cfg.head_dim, len(heads) * cfg.head_dim
    part = size // tp.world_size
    return tp.rank * part, part


def check_tp(cfg: ModelConfig, world_size: int) -> None:
    """Raise CheckpointError when the model cannot be split `world_size` ways."""
    for name, value in (
        ("num_attention_heads", cfg.num_heads),
        ("intermediate_size", cfg.intermediate_size),
    ):
        if value % world_size:
            raise CheckpointError(
                f"config.json: field '{name}' = {value} is not divisible by "
                f"tensor_parallel_size = {world_size}"
            )
    error = tp_kv_error(cfg.num_kv_heads, world_size)
    if error is not None:
        raise CheckpointError(f"config.json: field 'num_key_value_heads' = {cfg.num_kv_heads}: {error}")


def _shard(t: torch.Tensor, dim: int, span: tuple[int, int]) -> torch.Tensor:
    part = t.narrow(dim, *span)
    return part if t.is_meta else part.clone()


def _shard_linear(linear: nn.Linear, name: str, dim: int, cfg: ModelConfig, tp: TPInfo) -> None:
    span = shard_range(f"{name}.weight", linear.weight.shape[dim], cfg, tp)
    weight = _shard(linear.weight.data, dim, span)
    linear.weight = nn.Parameter(weight, requires_grad=False)
    if linear.bias is not None and dim == 0:
        linear.bias = nn.Parameter(_shard(linear.bias.data, 0, span), requires_grad=False)
    linear.out_features, linear.in_features = weight.shape


def apply_tp(model: LlamaModel, tp: TPInfo) -> LlamaModel:
    """Shard every decoder layer for rank `tp.rank` of `tp.world_size`; returns the same model."""
    cfg = model.config
    check_tp(cfg, tp.world_size)
    if tp.world_size == 1:
        return model
    for layer in model.decoder_layers():
        attn, mlp = layer.self_attn, layer.mlp
        for name in COLUMN_PARALLEL:
            owner = attn if name.endswith(("q_proj", "k_proj", "v_proj")) else mlp
            _shard_linear(getattr(owner, name), name, 0, cfg, tp)
        _shard_linear(attn.o_proj, "o_proj", 1, cfg, tp)
        _shard_linear(mlp.down_proj, "down_proj", 1, cfg, tp)
        attn.num_heads //= tp.world_size
        attn.num_kv_heads = kv_heads_per_rank(cfg.num_kv_heads, tp.world_size)
        attn.tp_size = mlp.tp_size = tp.world_size
        attn.tp_group = mlp.tp_group = tp.group
    return model
