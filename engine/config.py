"""The engine's two configs: what to run (`EngineConfig`) and what the model is (`ModelConfig`).

`EngineConfig` is the one place the engine's defaults are written (block size, chunk size, batch
size...); the workers embed it and deploy/ fills it from YAML. `ModelConfig` is read from a Hugging
Face `config.json` (+ `generation_config.json`), with both the classic field names (`rope_theta`,
`rope_scaling`, `torch_dtype`) and the transformers>=5 ones (`rope_parameters`, `dtype`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM")
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_NAMES = tuple(DTYPES)  # the dtypes weights and KV may have
_DEFAULT_ROPE_THETA = 10000.0

DEFAULT_MODEL_DIR = str(Path(__file__).resolve().parent / "default_model")  # the bundled tiny Llama
BLOCK_SIZE = 16  # tokens per KV block
MAX_NUM_BATCHED_TOKENS = 512  # tokens per forward step (the prefill chunk)
MAX_NUM_SEQS = 64  # sequences in the running batch


@dataclass(frozen=True, slots=True)
class EngineConfig:
    model: str  # Hugging Face model directory
    dtype: str = "float32"
    block_size: int = BLOCK_SIZE
    num_blocks: int | None = None  # None: fit kv_cache_bytes (capped at what max_num_seqs can use)
    max_num_batched_tokens: int = MAX_NUM_BATCHED_TOKENS
    max_num_seqs: int = MAX_NUM_SEQS
    quantization: str = "none"
    seed: int = 0
    device: str = "cpu"
    max_model_len: int | None = None  # None: the model's max_position_embeddings
    kv_cache_bytes: int = 1 << 30

    def __post_init__(self) -> None:
        if self.dtype not in DTYPE_NAMES:
            raise ValueError(f"EngineConfig.dtype must be one of {sorted(DTYPE_NAMES)}, "
                             f"got {self.dtype!r}")


class CheckpointError(ValueError):
    """A model directory that pdserve cannot load; the message names the file and the field."""


@dataclass(frozen=True, slots=True)
class ModelConfig:
    architecture: str  # LlamaForCausalLM | Qwen2ForCausalLM | MistralForCausalLM
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: tuple[tuple[str, Any], ...] | None  # sorted items of HF rope_scaling
    tie_word_embeddings: bool
    qkv_bias: bool
    torch_dtype: str  # from config.json, e.g. "float32"
    eos_token_ids: tuple[int, ...]  # config.json + generation_config.json
    sliding_window: int | None = None  # Mistral: attend to the last `sliding_window` tokens

    def rope_scaling_dict(self) -> dict[str, Any] | None:
        return dict(self.rope_scaling) if self.rope_scaling is not None else None


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


def _field(raw: dict[str, Any], path: Path, name: str, kind: type) -> Any:
    if name not in raw or raw[name] is None:
        raise CheckpointError(f"{path}: missing field '{name}'")
    value = raw[name]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise CheckpointError(f"{path}: field '{name}' must be {kind.__name__}, got {value!r}")
    return value


def _eos_ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)


def _architecture(raw: dict[str, Any], path: Path) -> str:
    archs = raw.get("architectures")
    if not archs:
        raise CheckpointError(f"{path}: missing field 'architectures'")
    arch = archs[0]
    if arch not in SUPPORTED_ARCHITECTURES:
        raise CheckpointError(
            f"{path}: field 'architectures' = {arch!r} is not supported "
            f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
        )
    return str(arch)


def _rope(raw: dict[str, Any], path: Path) -> tuple[float, tuple[tuple[str, Any], ...] | None]:
    params = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    theta = raw.get("rope_theta", params.get("rope_theta", _DEFAULT_ROPE_THETA))
    scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "default":
        return float(theta), None
    if rope_type != "llama3":
        raise CheckpointError(f"{path}: field 'rope_scaling.rope_type' = {rope_type!r} unsupported")
    for key in (
        "factor",
        "low_freq_factor",
        "high_freq_factor",
        "original_max_position_embeddings",
    ):
        if key not in scaling:
            raise CheckpointError(f"{path}: missing field 'rope_scaling.{key}' for llama3 rope")
    scaling["rope_type"] = "llama3"
    scaling.pop("type", None)
    return float(theta), tuple(sorted(scaling.items()))


def _check_unsupported(raw: dict[str, Any], path: Path, arch: str) -> None:
    if arch != "Qwen2ForCausalLM" and raw.get("attention_bias"):
        raise CheckpointError(f"{path}: field 'attention_bias' = true is not supported")
    if raw.get("mlp_bias"):
        raise CheckpointError(f"{path}: field 'mlp_bias' = true is not supported")
    act = raw.get("hidden_act", "silu")
    if act != "silu":
        raise CheckpointError(f"{path}: field 'hidden_act' = {act!r} is not supported (silu only)")


def _sliding_window(raw: dict[str, Any], path: Path, arch: str) -> int | None:
    if arch == "Qwen2ForCausalLM":
        if raw.get("use_sliding_window"):
            raise CheckpointError(f"{path}: field 'use_sliding_window' = true is not supported")
        return None
    window = raw.get("sliding_window")
    return int(window) if window else None


def load_config(model_dir: str | Path) -> ModelConfig:
    """Read `model_dir/config.json` (and `generation_config.json` when present)."""
    path = Path(model_dir) / "config.json"
    raw = _read_json(path)
    arch = _architecture(raw, path)
    _check_unsupported(raw, path, arch)
    hidden = _field(raw, path, "hidden_size", int)
    heads = _field(raw, path, "num_attention_heads", int)
    head_dim = raw.get("head_dim") or hidden // heads
    theta, scaling = _rope(raw, path)
    eos = list(_eos_ids(raw.get("eos_token_id")))
    gen_path = Path(model_dir) / "generation_config.json"
    if gen_path.is_file():
        eos += [i for i in _eos_ids(_read_json(gen_path).get("eos_token_id")) if i not in eos]
    return ModelConfig(
        architecture=arch,
        vocab_size=_field(raw, path, "vocab_size", int),
        hidden_size=hidden,
        intermediate_size=_field(raw, path, "intermediate_size", int),
        num_layers=_field(raw, path, "num_hidden_layers", int),
        num_heads=heads,
        num_kv_heads=int(raw.get("num_key_value_heads") or heads),
        head_dim=int(head_dim),
        max_position_embeddings=_field(raw, path, "max_position_embeddings", int),
        rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_scaling=scaling,
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        qkv_bias=arch == "Qwen2ForCausalLM",
        torch_dtype=str(raw.get("torch_dtype") or raw.get("dtype") or "float32"),
        eos_token_ids=tuple(eos),
        sliding_window=_sliding_window(raw, path, arch),
    )
