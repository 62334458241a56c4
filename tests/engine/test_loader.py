"""Config/loader errors, sharded + TP-sliced loading, the per-layer hook, tokenizer, make_model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine import loader
from engine.config import CheckpointError, load_config
from engine.make_model import make_model, write_safetensors
from engine.model import build_model
from engine.stop import IncrementalDetokenizer
from engine.tokenizer import Tokenizer
from engine.tp import TPInfo

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model(tmp_path_factory.mktemp("ckpt") / "tiny", "qwen2", "tiny", seed=1)


@pytest.fixture
def ckpt(base: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(base, tmp_path / "m"))


def _edit_config(ckpt: Path, **changes: Any) -> None:
    path = ckpt / "config.json"
    raw = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            raw.pop(key)
        else:
            raw[key] = value
    path.write_text(json.dumps(raw))


def _rewrite_weights(ckpt: Path, edit: Any) -> None:
    path = ckpt / "model.safetensors"
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path))


def _error(ckpt: Path) -> str:
    with pytest.raises(CheckpointError) as info:
        build_model(ckpt, torch.float32)
    return str(info.value)


def test_missing_config(ckpt: Path) -> None:
    (ckpt / "config.json").unlink()
    msg = _error(ckpt)
    assert "config.json" in msg and "not found" in msg


def test_unsupported_architecture(ckpt: Path) -> None:
    _edit_config(ckpt, architectures=["GPT2LMHeadModel"])
    msg = _error(ckpt)
    assert "config.json" in msg and "architectures" in msg and "GPT2LMHeadModel" in msg


def test_missing_field(ckpt: Path) -> None:
    _edit_config(ckpt, hidden_size=None)
    msg = _error(ckpt)
    assert "config.json" in msg and "'hidden_size'" in msg


def test_missing_safetensors(ckpt: Path) -> None:
    (ckpt / "model.safetensors").unlink()
    assert "model.safetensors" in _error(ckpt)


def test_wrong_shape(ckpt: Path) -> None:
    name = "model.layers.1.self_attn.k_proj.weight"
    _rewrite_weights(ckpt, lambda t: t.__setitem__(name, torch.zeros(16, 64)))
    msg = _error(ckpt)
    assert "model.safetensors" in msg and name in msg and "[16, 64]" in msg and "[32, 64]" in msg


def test_missing_tensor(ckpt: Path) -> None:
    name = "model.layers.0.mlp.up_proj.weight"
    _rewrite_weights(ckpt, lambda t: t.pop(name))
    msg = _error(ckpt)
    assert "model.safetensors" in msg and name in msg


@pytest.mark.parametrize("keep", [5, 100, -64])
def test_truncated_file(ckpt: Path, keep: int) -> None:
    path = ckpt / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[:keep])
    msg = _error(ckpt)
    assert str(path) in msg


def test_index_lists_missing_shard(ckpt: Path) -> None:
    tensors = load_file(str(ckpt / "model.safetensors"))
    (ckpt / "model.safetensors").unlink()
    write_safetensors(ckpt, tensors, max_shard_bytes=40_000)
    shards = sorted(ckpt.glob("model-*.safetensors"))
    shards[-1].unlink()
    assert shards[-1].name in _error(ckpt)


def test_tp_indivisible_heads(tmp_path: Path) -> None:
    """3 KV heads of 6 query heads cannot be split 2 ways (neither count divides the other); 4 ways of
    2 KV heads can (replicated heads), so that checkpoint passes the check."""
    make_model(tmp_path, "llama", "tiny")
    _edit_config(tmp_path, num_attention_heads=6, num_key_value_heads=3, head_dim=16)
    with pytest.raises(CheckpointError, match="num_key_value_heads' = 3: 2 ranks cannot share 3"):
        build_model(tmp_path, torch.float32, TPInfo(rank=0, world_size=2, group=None))


def test_config_fields(tmp_path: Path) -> None:
    make_model(tmp_path, "llama", "tiny")
    _edit_config(
        tmp_path,
        head_dim=None,
        rope_theta=None,
        eos_token_id=[0, 5],
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
            "rope_theta": 5e5,
        },
    )
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [5, 7]}))
    cfg = load_config(tmp_path)
    assert cfg.head_dim == 16 and cfg.rope_theta == 5e5 and cfg.eos_token_ids == (0, 5, 7)
    assert cfg.rope_scaling_dict() == {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    }
    _edit_config(tmp_path, rope_scaling={"rope_type": "llama3", "factor": 8.0})
    with pytest.raises(CheckpointError, match="low_freq_factor"):
        load_config(tmp_path)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_sharded_load_matches_single(ckpt: Path, base: Path, dtype: torch.dtype) -> None:
    tensors = load_file(str(ckpt / "model.safetensors"))
    (ckpt / "model.safetensors").unlink()
    write_safetensors(ckpt, tensors, max_shard_bytes=40_000)
    assert len(list(ckpt.glob("model-*.safetensors"))) > 2
    sharded, single = build_model(ckpt, dtype), build_model(base, dtype)
    for (name, a), (_, b) in zip(
        sharded.state_dict().items(), single.state_dict().items(), strict=True
    ):
        assert a.dtype == dtype and torch.equal(a, b), name
        assert torch.equal(a, tensors[loader.hf_name(name)].to(dtype)), name


class _SpySlice:
    def __init__(self, inner: Any, name: str, log: list[tuple[str, tuple[int, ...]]]) -> None:
        self._inner, self._name, self._log = inner, name, log

    def get_shape(self) -> list[int]:
        return list(self._inner.get_shape())

    def __getitem__(self, index: Any) -> torch.Tensor:
        out = self._inner[index]
        self._log.append((self._name, tuple(out.shape)))
        return out


class _SpyFile:
    def __init__(self, inner: Any, log: list[tuple[str, tuple[int, ...]]]) -> None:
        self._inner, self._log = inner, log

    def __enter__(self) -> _SpyFile:
        self._inner.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._inner.__exit__(*exc)

    def keys(self) -> list[str]:
        return list(self._inner.keys())

    def get_slice(self, name: str) -> _SpySlice:
        return _SpySlice(self._inner.get_slice(name), name, self._log)

    def get_tensor(self, name: str) -> torch.Tensor:
        raise AssertionError(f"full read of {name}")


def test_tp_rank_reads_only_its_slices(base: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    log: list[tuple[str, tuple[int, ...]]] = []
    real_open = loader.safe_open
    monkeypatch.setattr(loader, "safe_open", lambda *a, **k: _SpyFile(real_open(*a, **k), log))
    full = build_model(base, torch.float32)
    cfg = load_config(base)
    for rank in (0, 1):
        log.clear()
        model = build_model(base, torch.float32, TPInfo(rank=rank, world_size=2, group=None))
        reads = dict(log)
        assert len(reads) == len(log) == len(loader.expected_shapes(cfg))  # each tensor read once
        for name, shape in loader.expected_shapes(cfg).items():
            dim = loader.shard_dim(name)
            want = list(shape)
            if dim is not None:
                want[dim] //= 2
            assert reads[name] == tuple(want), name
        q_full = full.decoder_layers()[0].self_attn.q_proj.weight
        assert torch.equal(
            model.decoder_layers()[0].self_attn.q_proj.weight, q_full.chunk(2, 0)[rank]
        )
        d_full = full.decoder_layers()[1].mlp.down_proj.weight
        assert torch.equal(model.decoder_layers()[1].mlp.down_proj.weight, d_full.chunk(2, 1)[rank])
        b_full = full.decoder_layers()[1].self_attn.v_proj.bias
        assert torch.equal(
            model.decoder_layers()[1].self_attn.v_proj.bias, b_full.chunk(2, 0)[rank]
        )


def test_quantize_layer_hook_runs_after_each_layer(base: Path) -> None:
    seen: list[bool] = []

    def hook(layer: torch.nn.Module) -> None:
        seen.append(all(not p.is_meta for p in layer.parameters()))
        layer.get_submodule("mlp").up_proj = torch.nn.Identity()  # a quant pass swaps modules

    model = build_model(base, torch.float32, quantize_layer=hook)
    assert seen == [True, True]
    assert all(isinstance(layer.mlp.up_proj, torch.nn.Identity) for layer in model.decoder_layers())
    assert not any(p.is_meta for p in model.parameters())


def test_tokenizer_roundtrip_and_incremental(base: Path) -> None:
    tok = Tokenizer.from_model_dir(base)
    assert tok.vocab_size == 1000 and tok.eos_token_ids == (0,)
    text = "def f(x): return x  # naïve 🙂 café"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    dec = IncrementalDetokenizer(tok, tok.encode("prompt:"))
    pieces = [dec.push(i) for i in ids] + [dec.flush()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)


def test_make_model_small_shape(tmp_path: Path) -> None:
    from engine.make_model import config_json

    raw = config_json("llama", "small")
    assert (raw["hidden_size"], raw["num_hidden_layers"], raw["num_attention_heads"]) == (
        576,
        30,
        9,
    )
    assert (raw["num_key_value_heads"], raw["intermediate_size"], raw["vocab_size"]) == (
        3,
        1536,
        49152,
    )


def test_tokenizer_adds_bos_only_when_post_processor_does(tmp_path: Path) -> None:
    from tokenizers import processors

    from engine.make_model import train_tokenizer

    raw = train_tokenizer()
    raw.save(str(tmp_path / "plain.json"))
    raw.post_processor = processors.TemplateProcessing(
        single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", 0)]
    )
    raw.save(str(tmp_path / "bos.json"))
    plain, bos = Tokenizer(tmp_path / "plain.json"), Tokenizer(tmp_path / "bos.json")
    assert bos.encode("hello world") == [0, *plain.encode("hello world")]
    assert bos.decode(bos.encode("hello world")) == "hello world"
