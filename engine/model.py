"""The Llama-family decoder (Llama 2/3, Qwen2, Mistral), written once for one device.

Tensor parallelism (`engine.tp.apply_tp`) and quantization (`engine.quant`) are passes that
shrink or swap the `nn.Linear` projections afterwards. Parameter names match Hugging Face's
without the leading "model." (see `engine.loader.hf_name`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import cast

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from engine.attention import AttnMetadata, AttnPlan, GatherBuffers, paged_attention, plan_attention
from engine.config import ModelConfig, load_config
from engine.loader import load_weights
from engine.quant import QuantConfig, check_supported, quantize_layer_fn
from engine.tp import TPInfo, apply_tp


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [T, D]; normalise in fp32 like HF, scale in the input dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """[head_dim / 2] fp32 inverse frequencies, with llama3 scaling when configured."""
    exponents = torch.arange(0, cfg.head_dim, 2, dtype=torch.int64, device="cpu").float()
    inv_freq = 1.0 / (cfg.rope_theta ** (exponents / cfg.head_dim))
    scaling = cfg.rope_scaling_dict()
    if scaling is None:
        return inv_freq
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < old_len / high) * ~(wavelen > old_len / low)
    return torch.where(is_medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    """Precomputed cos/sin tables indexed by position (non-interleaved halves, like HF)."""

    cos: torch.Tensor
    sin: torch.Tensor

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        positions = torch.arange(cfg.max_position_embeddings, device="cpu").float()
        freqs = torch.outer(positions, rope_inv_freq(cfg))  # [P, D/2]
        self.register_buffer("cos", freqs.cos(), persistent=False)
        self.register_buffer("sin", freqs.sin(), persistent=False)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cos[positions], self.sin[positions]  # [T, D/2] each


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: [T, H, D], cos/sin: [T, D/2]
    cos, sin = cos[:, None, :].to(x.dtype), sin[:, None, :].to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = (
            cfg.num_heads,
            cfg.num_kv_heads,
            cfg.head_dim,
        )
        q_dim, kv_dim = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, q_dim, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, kv_dim, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, kv_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(q_dim, cfg.hidden_size, bias=False)
        self.tp_size = 1  # set by apply_tp: > 1 -> all-reduce o_proj's output over tp_group
        self.tp_group: dist.ProcessGroup | None = None

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_layer: torch.Tensor,
        plan: AttnPlan,
    ) -> torch.Tensor:
        t = x.shape[0]  # x: [T, hidden]
        q = self.q_proj(x).view(t, self.num_heads, self.head_dim)  # [T, Hq, D]
        k = self.k_proj(x).view(t, self.num_kv_heads, self.head_dim)  # [T, H, D]
        v = self.v_proj(x).view(t, self.num_kv_heads, self.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = paged_attention(q, k, v, kv_layer, plan)  # [T, Hq, D]
        out = self.o_proj(out.reshape(t, -1))  # [T, hidden] (partial sum under TP)
        if self.tp_size > 1:
            dist.all_reduce(out, group=self.tp_group)
        return out


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self.tp_size = 1  # set by apply_tp: > 1 -> all-reduce down_proj's output over tp_group
        self.tp_group: dist.ProcessGroup | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [T, hidden] -> [T, hidden]
        out = self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        if self.tp_size > 1:
            dist.all_reduce(out, group=self.tp_group)
        return out


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_layer: torch.Tensor,
        plan: AttnPlan,
    ) -> torch.Tensor:
        h = x + self.self_attn(self.input_layernorm(x), cos, sin, kv_layer, plan)
        return h + self.mlp(self.post_attention_layernorm(h))


class LlamaModel(nn.Module):
    """Embeddings -> decoder layers over the paged KV cache -> final norm; lm_head for logits."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary = RotaryEmbedding(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.gather_buffers = GatherBuffers()  # decode attention's K/V gather, reused every layer

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttnMetadata, kv: torch.Tensor
    ) -> torch.Tensor:
        """input_ids, positions: [T] (all sequences' new tokens, concatenated) -> hidden [T, D].

        kv: [num_blocks, num_layers, 2, H_local, block_size, head_dim]; the new tokens' K/V
        are written at meta.slot_mapping. The returned hidden states are after the final norm.
        """
        plan = plan_attention(meta, kv.shape[4], self.config.sliding_window, self.gather_buffers)
        cos, sin = self.rotary(positions)  # [T, D/2]
        h = self.embed_tokens(input_ids)  # [T, hidden]
        for i, layer in enumerate(self.layers):
            h = layer(h, cos, sin, kv[:, i], plan)
        return self.norm(h)

    def decoder_layers(self) -> list[DecoderLayer]:
        """self.layers with its element type (nn.ModuleList indexing is untyped)."""
        return [cast(DecoderLayer, layer) for layer in self.layers]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [N, D] -> logits [N, vocab] fp32."""
        return self.lm_head(hidden).float()


def build_model(
    model_dir: str | Path,
    dtype: torch.dtype,
    tp: TPInfo | None = None,
    *,
    device: str | torch.device = "cpu",
    quantize_layer: Callable[[nn.Module], None] | None = None,
) -> LlamaModel:
    """Build on the meta device, shard for `tp` (apply_tp), then load only this rank's slices
    layer by layer; `quantize_layer(layer)` runs on each decoder layer right after it is loaded."""
    cfg = load_config(model_dir)
    with torch.device("meta"):
        model = LlamaModel(cfg)
    if tp is not None:
        apply_tp(model, tp)
    load_weights(model, model_dir, dtype, tp, device=device, quantize_layer=quantize_layer)
    return model.eval()


def build_engine_model(
    model_dir: str | Path, dtype: torch.dtype, tp: TPInfo | None, device: torch.device, quantization: str
) -> LlamaModel:
    """build_model plus the quantization hook (engine.quant, applied layer by layer while loading)."""
    hook = None
    if quantization != "none":
        check_supported(quantization, device)
        hook = quantize_layer_fn(QuantConfig(method=quantization))  # type: ignore[arg-type]
    return build_model(model_dir, dtype, tp, device=device, quantize_layer=hook)
