"""Hugging Face safetensors -> a meta-built `LlamaModel`, layer by layer, slices only.

Every tensor is read through `safe_open(...).get_slice(name)`: a tensor-parallel rank reads
only its rows/columns, never the whole tensor. Shapes are checked against config.json before
any data is read. Peak memory stays at (already loaded, possibly quantized layers) + one layer.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from engine.config import CheckpointError, ModelConfig
from engine.tp import TPInfo, shard_dim, shard_range

if TYPE_CHECKING:
    from engine.model import LlamaModel

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


def hf_name(param_name: str) -> str:
    """pdserve parameter name -> checkpoint tensor name."""
    return param_name if param_name.startswith("lm_head.") else f"model.{param_name}"


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Full (unsharded) shape of every tensor the model needs, by checkpoint name."""
    hid, inter, q_dim = cfg.hidden_size, cfg.intermediate_size, cfg.num_heads * cfg.head_dim
    kv_dim = cfg.num_kv_heads * cfg.head_dim
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (cfg.vocab_size, hid),
        "model.norm.weight": (hid,),
    }
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, hid)
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        shapes |= {
            p + "input_layernorm.weight": (hid,),
            p + "post_attention_layernorm.weight": (hid,),
            p + "self_attn.q_proj.weight": (q_dim, hid),
            p + "self_attn.k_proj.weight": (kv_dim, hid),
            p + "self_attn.v_proj.weight": (kv_dim, hid),
            p + "self_attn.o_proj.weight": (hid, q_dim),
            p + "mlp.gate_proj.weight": (inter, hid),
            p + "mlp.up_proj.weight": (inter, hid),
            p + "mlp.down_proj.weight": (hid, inter),
        }
        if cfg.qkv_bias:
            shapes |= {
                p + "self_attn.q_proj.bias": (q_dim,),
                p + "self_attn.k_proj.bias": (kv_dim,),
            }
            shapes[p + "self_attn.v_proj.bias"] = (kv_dim,)
    return shapes


def _index_weight_map(model_dir: Path) -> dict[str, Path]:
    path = model_dir / INDEX_FILE
    try:
        weight_map = json.loads(path.read_text())["weight_map"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: unreadable index, field 'weight_map' ({e})") from e
    return {name: model_dir / file for name, file in weight_map.items()}


def weight_files(model_dir: str | Path) -> dict[str, Path]:
    """Checkpoint tensor name -> the safetensors file holding it (single file or sharded)."""
    model_dir = Path(model_dir)
    if (model_dir / INDEX_FILE).is_file():
        files = _index_weight_map(model_dir)
    elif (model_dir / SINGLE_FILE).is_file():
        path = model_dir / SINGLE_FILE
        with _open(path) as f:
            files = dict.fromkeys(f.keys(), path)
    else:
        raise CheckpointError(f"{model_dir / SINGLE_FILE}: file not found (nor {INDEX_FILE})")
    for path in set(files.values()):
        if not path.is_file():
            raise CheckpointError(f"{path}: file not found (listed in {INDEX_FILE})")
    return files


def _open(path: Path) -> Any:
    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from e


class CheckpointReader:
    """Open safetensors files lazily; read (a TP slice of) one tensor at a time, shape-checked."""

    def __init__(self, model_dir: str | Path, cfg: ModelConfig, stack: ExitStack) -> None:
        self.cfg = cfg
        self.files = weight_files(model_dir)
        self.shapes = expected_shapes(cfg)
        self._stack = stack
        self._handles: dict[Path, Any] = {}
        missing = [n for n in self.shapes if n not in self.files]
        if missing:
            where = Path(model_dir) / (
                INDEX_FILE if (Path(model_dir) / INDEX_FILE).is_file() else SINGLE_FILE
            )
            raise CheckpointError(f"{where}: missing tensor(s) {', '.join(missing[:5])}")

    def _handle(self, path: Path) -> Any:
        if path not in self._handles:
            self._handles[path] = self._stack.enter_context(_open(path))
        return self._handles[path]

    def read(self, name: str, dim: int | None, tp: TPInfo | None) -> torch.Tensor:
        """Tensor `name`, or this rank's slice of it along `dim`."""
        path = self.files[name]
        try:
            piece = self._handle(path).get_slice(name)
            shape = tuple(piece.get_shape())
            if shape != self.shapes[name]:
                raise CheckpointError(
                    f"{path}: tensor '{name}' has shape {list(shape)}, "
                    f"expected {list(self.shapes[name])} from config.json"
                )
            if tp is None or dim is None or tp.world_size == 1:
                return piece[:]
            start, size = shard_range(name, shape[dim], self.cfg, tp)
            part = slice(start, start + size)
            return piece[part] if dim == 0 else piece[:, part]
        except (SafetensorError, OSError, RuntimeError) as e:
            raise CheckpointError(f"{path}: cannot read tensor '{name}' ({e})") from e


def _params(module: nn.Module, prefix: str) -> Iterator[tuple[str, nn.Module, str]]:
    for full, _ in module.named_parameters(prefix=prefix):
        owner_path, _, leaf = full.rpartition(".")
        yield full, module.get_submodule(owner_path.removeprefix(prefix).lstrip(".")), leaf


def _load_module(
    module: nn.Module,
    prefix: str,
    reader: CheckpointReader,
    dtype: torch.dtype,
    tp: TPInfo | None,
    device: torch.device,
) -> None:
    for full, owner, leaf in list(_params(module, prefix)):
        tensor = reader.read(hf_name(full), shard_dim(full), tp).to(device=device, dtype=dtype)
        expected = getattr(owner, leaf).shape
        if tensor.shape != expected:  # a bug in apply_tp/shard_dim, not in the checkpoint
            raise RuntimeError(f"{full}: loaded {list(tensor.shape)}, model wants {list(expected)}")
        setattr(owner, leaf, nn.Parameter(tensor, requires_grad=False))


def load_weights(
    model: LlamaModel,
    model_dir: str | Path,
    dtype: torch.dtype,
    tp: TPInfo | None = None,
    *,
    device: str | torch.device = "cpu",
    quantize_layer: Callable[[nn.Module], None] | None = None,
) -> None:
    """Fill a meta-device LlamaModel (already `apply_tp`-ed when tp is given) from model_dir."""
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"unsupported dtype {dtype}; use float32, bfloat16 or float16")
    cfg = model.config
    dev = torch.device(device)
    with ExitStack() as stack:
        reader = CheckpointReader(model_dir, cfg, stack)
        _load_module(model.embed_tokens, "embed_tokens", reader, dtype, tp, dev)
        _load_module(model.norm, "norm", reader, dtype, tp, dev)
        if cfg.tie_word_embeddings:
            model.lm_head.weight = model.embed_tokens.weight
        else:
            _load_module(model.lm_head, "lm_head", reader, dtype, tp, dev)
        for i, layer in enumerate(model.decoder_layers()):
            _load_module(layer, f"layers.{i}", reader, dtype, tp, dev)
            if quantize_layer is not None:
                quantize_layer(layer)
    model.rotary.to(dev)
