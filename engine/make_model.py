"""Write a random-weight Hugging Face checkpoint with pdserve's own writer (no transformers).

`make_model(dir, arch="llama"|"qwen2"|"mistral", size="tiny"|"small")` writes config.json,
generation_config.json, model.safetensors (or shards + index) and tokenizer.json (a byte-level
BPE trained on the stdlib's pydoc topics, ~1000 tokens). "small" has SmolLM-135M's shape; the
model vocab is padded above the tokenizer's.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from engine.config import load_config
from engine.loader import INDEX_FILE, SINGLE_FILE, expected_shapes

EOS_TOKEN = "<|endoftext|>"  # id 0
TOKENIZER_VOCAB = 1000
ARCHS = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM"}
SIZES: dict[str, dict[str, Any]] = {
    "tiny": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=1024,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        torch_dtype="float32",
    ),
    "small": dict(
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        vocab_size=49152,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        torch_dtype="bfloat16",
    ),
}


def train_tokenizer(vocab_size: int = TOKENIZER_VOCAB) -> Tokenizer:
    """Byte-level BPE trained on pydoc_data's topics (deterministic, ~0.2 s)."""
    from pydoc_data.topics import topics

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    text = "\n".join(topics[k] for k in sorted(topics))
    tok.train_from_iterator(text.splitlines(), trainer)
    return tok


def write_tokenizer(model_dir: str | Path) -> int:
    """Write tokenizer.json into model_dir; returns its vocab size."""
    tok = train_tokenizer()
    tok.save(str(Path(model_dir) / "tokenizer.json"))
    return int(tok.get_vocab_size())


def config_json(arch: str, size: str) -> dict[str, Any]:
    if arch not in ARCHS or size not in SIZES:
        raise ValueError(f"arch must be one of {sorted(ARCHS)}, size one of {sorted(SIZES)}")
    return {
        "architectures": [ARCHS[arch]],
        "model_type": arch,
        **SIZES[size],
        "head_dim": SIZES[size]["hidden_size"] // SIZES[size]["num_attention_heads"],
        "hidden_act": "silu",
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "bos_token_id": 0,
        "eos_token_id": 0,
        **({"sliding_window": None} if arch == "mistral" else {}),
    }


def random_weights(model_dir: str | Path, seed: int) -> dict[str, torch.Tensor]:
    """Random tensors for every name the loader expects (norms = 1, the rest ~ N(0, 0.02))."""
    cfg = load_config(model_dir)
    gen = torch.Generator().manual_seed(seed)
    dtype = getattr(torch, cfg.torch_dtype)
    out: dict[str, torch.Tensor] = {}
    for name, shape in expected_shapes(cfg).items():
        if name.endswith("norm.weight"):
            out[name] = torch.ones(shape, dtype=dtype)
        else:
            out[name] = (torch.randn(shape, generator=gen) * 0.02).to(dtype)
    return out


def _shards(tensors: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t.contiguous()
        size += nbytes
    return shards


def write_safetensors(
    model_dir: str | Path, tensors: dict[str, torch.Tensor], max_shard_bytes: int | None = None
) -> None:
    """model.safetensors, or model-0000i-of-0000n.safetensors + index when over max_shard_bytes."""
    model_dir = Path(model_dir)
    meta = {"format": "pt"}
    if max_shard_bytes is None:
        save_file(
            {k: t.contiguous() for k, t in tensors.items()}, str(model_dir / SINGLE_FILE), meta
        )
        return
    shards = _shards(tensors, max_shard_bytes)
    weight_map: dict[str, str] = {}
    for i, shard in enumerate(shards, 1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(model_dir / file), meta)
        weight_map |= dict.fromkeys(shard, file)
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (model_dir / INDEX_FILE).write_text(json.dumps(index, indent=2))


def make_model(
    model_dir: str | Path,
    arch: str = "llama",
    size: str = "tiny",
    seed: int = 0,
    max_shard_bytes: int | None = None,
) -> Path:
    """Write a complete random-weight checkpoint into model_dir (created if needed)."""
    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / "config.json").write_text(json.dumps(config_json(arch, size), indent=2))
    (model_dir / "generation_config.json").write_text(
        json.dumps({"bos_token_id": 0, "eos_token_id": 0}, indent=2)
    )
    write_tokenizer(model_dir)
    write_safetensors(model_dir, random_weights(model_dir, seed), max_shard_bytes)
    return model_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pdserve make-model", description=__doc__)
    parser.add_argument("dir")
    parser.add_argument("--arch", default="llama", choices=sorted(ARCHS))
    parser.add_argument("--size", default="tiny", choices=sorted(SIZES))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(make_model(args.dir, args.arch, args.size, args.seed))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
