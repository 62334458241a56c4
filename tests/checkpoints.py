"""Shared test helpers: tiny Hugging Face checkpoints written by `transformers` itself.

    write_hf_checkpoint(path, kind) -> path      kind in KINDS
    write_tiny_model(path) -> path               engine.make_model's tiny llama (its own BPE tokenizer)

Every kind: hidden 64, 2 layers, 4 heads, 2 KV heads (or 1 / 4: `num_kv_heads`), vocab 1024 (>= the tokenizer's 1000),
fp32, seeded random init, plus tokenizer.json from engine.make_model and generation_config.json.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from engine.make_model import make_model, write_tokenizer

KINDS = ("llama", "llama_tied_rope3", "qwen2", "mistral")
VOCAB = 1024
EOS_ID = 0

_COMMON: dict[str, Any] = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=VOCAB,
    max_position_embeddings=512,
    rms_norm_eps=1e-5,
    bos_token_id=EOS_ID,
    eos_token_id=EOS_ID,
    initializer_range=0.05,
)


def _hf_model(kind: str, num_kv_heads: int = 2) -> Any:
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    llama3 = {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    }
    extra: dict[str, dict[str, Any]] = {
        "llama": dict(rope_theta=10000.0, tie_word_embeddings=False),
        "llama_tied_rope3": dict(rope_scaling=llama3, tie_word_embeddings=True),
        "qwen2": dict(rope_theta=1000000.0, tie_word_embeddings=False),
        # a window shorter than the test prompts, so sliding-window masking is exercised
        "mistral": dict(sliding_window=8, tie_word_embeddings=False),
    }
    classes: dict[str, tuple[Any, Any]] = {
        "llama": (LlamaConfig, LlamaForCausalLM),
        "llama_tied_rope3": (LlamaConfig, LlamaForCausalLM),
        "qwen2": (Qwen2Config, Qwen2ForCausalLM),
        "mistral": (MistralConfig, MistralForCausalLM),
    }
    if kind in classes:
        config_cls, model_cls = classes[kind]
        common = {**_COMMON, "num_key_value_heads": num_kv_heads}
        return model_cls(config_cls(**common, **extra[kind]))
    raise ValueError(f"unknown checkpoint kind {kind!r}; choose from {KINDS}")


def write_hf_checkpoint(path: Path, kind: str, seed: int = 0, num_kv_heads: int = 2) -> Path:
    """Write a tiny random `kind` checkpoint (config.json, model.safetensors, tokenizer.json);
    num_kv_heads: 1 (MQA), 2 (GQA, the default) or 4 (MHA) of the 4 attention heads."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = _hf_model(kind, num_kv_heads).to(torch.float32)
    with torch.no_grad():  # HF inits norms to 1 and biases to 0; make them matter
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.normal_(1.0, 0.1)
            elif name.endswith(".bias"):
                param.normal_(0.0, 0.1)
    model.save_pretrained(path)
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [EOS_ID]}))
    write_tokenizer(path)
    return path


def write_tiny_model(path: Path, seed: int = 0) -> Path:
    """The tiny llama that `engine.make_model` writes (what the in-process worker rigs serve)."""
    return Path(make_model(path, arch="llama", size="tiny", seed=seed))


def load_hf_model(path: Path) -> Any:
    """The transformers model for a checkpoint (eval, fp32, eager attention)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation="eager"
    )
    return model.eval()


class PagedRunner:
    """Drive a pdserve LlamaModel over its own paged cache (scrambled block ids, small blocks)."""

    def __init__(
        self, model: Any, num_blocks: int = 64, block_size: int = 4, seed: int = 0
    ) -> None:
        from engine.attention import AttnMetadata

        self._meta_cls = AttnMetadata
        cfg, attn = model.config, model.layers[0].self_attn
        self.model, self.block_size = model, block_size
        dtype = model.embed_tokens.weight.dtype
        shape = (num_blocks, cfg.num_layers, 2, attn.num_kv_heads, block_size, cfg.head_dim)
        self.kv = torch.zeros(shape, dtype=dtype)
        perm = torch.randperm(num_blocks - 1, generator=torch.Generator().manual_seed(seed)) + 1
        self.free = perm.tolist()  # block 0 stays unused, like a padding block
        self.tables: dict[str, list[int]] = {}
        self.lens: dict[str, int] = {}

    def _slots(self, seq: str, n: int) -> list[int]:
        table, start = self.tables.setdefault(seq, []), self.lens.get(seq, 0)
        while len(table) * self.block_size < start + n:
            table.append(self.free.pop())
        self.lens[seq] = start + n
        return [
            table[p // self.block_size] * self.block_size + p % self.block_size
            for p in range(start, start + n)
        ]

    @torch.no_grad()
    def step(self, batch: list[tuple[str, list[int]]]) -> list[torch.Tensor]:
        """batch: (sequence id, new token ids) -> logits [len(new), vocab] per sequence."""
        starts = [self.lens.get(seq, 0) for seq, _ in batch]
        slots = [s for seq, toks in batch for s in self._slots(seq, len(toks))]
        width = max(len(self.tables[seq]) for seq, _ in batch)
        tables = [self.tables[seq] + [0] * (width - len(self.tables[seq])) for seq, _ in batch]
        meta = self._meta_cls(
            query_lens=[len(toks) for _, toks in batch],
            seq_lens=[self.lens[seq] for seq, _ in batch],
            block_tables=torch.tensor(tables, dtype=torch.int64),
            slot_mapping=torch.tensor(slots, dtype=torch.int64),
        )
        ids = torch.tensor([t for _, toks in batch for t in toks])
        pos = torch.tensor(
            [p for s, (_, toks) in zip(starts, batch, strict=True) for p in range(s, s + len(toks))]
        )
        logits = self.model.compute_logits(self.model(ids, pos, meta, self.kv))
        return list(logits.split(meta.query_lens))
