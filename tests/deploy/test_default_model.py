"""The committed default model (engine/default_model) is a real, small Llama that learned English.

Loads the checkpoint with `transformers` (no mocks), checks the config contract the serving engine
relies on, greedy-generates from a prompt and checks the words are real, and measures validation
perplexity on the held-out pydoc documents against the uniform baseline.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
from tokenizers import Tokenizer
from transformers import LlamaForCausalLM

from engine.config import DEFAULT_MODEL_DIR

# PDSERVE_DEFAULT_MODEL_DIR: check a freshly trained folder before committing it.
MODEL_DIR = Path(os.environ.get("PDSERVE_DEFAULT_MODEL_DIR", "") or DEFAULT_MODEL_DIR)
TRAIN_SCRIPT = Path(DEFAULT_MODEL_DIR) / "train.py"
FILES = ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json")
EOS = "<|endoftext|>"


def load_train_module() -> ModuleType:
    """The training script owns the data split; import it by path (it is not a package module)."""
    spec = importlib.util.spec_from_file_location("default_model_train", TRAIN_SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def model() -> LlamaForCausalLM:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    m = LlamaForCausalLM.from_pretrained(MODEL_DIR)
    return m.eval()


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.from_file(str(MODEL_DIR / "tokenizer.json"))


@pytest.fixture(scope="module")
def config() -> dict:
    return json.loads((MODEL_DIR / "config.json").read_text())


def test_files_present_and_small() -> None:
    for name in FILES:
        assert (MODEL_DIR / name).is_file(), name
    total = sum(p.stat().st_size for p in MODEL_DIR.iterdir() if p.is_file())
    assert total <= 20 * 1024 * 1024, f"default model folder is {total / 2**20:.1f} MiB"


def test_config_contract(config: dict, tok: Tokenizer) -> None:
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["model_type"] == "llama"
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    assert kv_heads < heads and heads % kv_heads == 0, "GQA expected"
    assert kv_heads % 2 == 0 and heads % 2 == 0, "prefill TP=2 must split the heads"
    assert config["hidden_size"] % heads == 0
    assert config["torch_dtype"] in ("float32", "bfloat16")
    assert config["max_position_embeddings"] >= 512
    eos_id = tok.token_to_id(EOS)
    assert eos_id is not None and config["eos_token_id"] == eos_id
    generation = json.loads((MODEL_DIR / "generation_config.json").read_text())
    assert generation["eos_token_id"] == eos_id
    assert tok.get_vocab_size() == config["vocab_size"]


def test_tokenizer_is_byte_level(tok: Tokenizer) -> None:
    for text in ("naïve café — 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ✓", "def f(x):\n\treturn x  # tab", "\x00\x7f"):
        assert tok.decode(tok.encode(text).ids) == text
    ids = tok.encode(f"one{EOS}two").ids
    assert tok.token_to_id(EOS) in ids


@torch.no_grad()
def test_greedy_text_is_real_words(model: LlamaForCausalLM,
                                   tok: Tokenizer) -> None:
    train_docs, _ = load_train_module().split_documents(0.05, seed=0)
    vocabulary = {w.lower() for w in re.findall(r"[A-Za-z]+", " ".join(train_docs))}
    ids = torch.tensor([tok.encode("The list").ids])  # [1, S]
    out = model.generate(ids, max_new_tokens=20, do_sample=False,
                         attention_mask=torch.ones_like(ids))  # [1, S + <=20]
    text = tok.decode(out[0, ids.shape[1]:].tolist())
    words = [re.sub(r"[^A-Za-z]", "", w).lower() for w in text.split()]
    words = [w for w in words if w]
    assert len(words) >= 5, f"too few words in {text!r}"
    known = sum(w in vocabulary for w in words) / len(words)
    assert known >= 0.6, f"{known:.0%} real words in {text!r}"
    assert len(set(words)) >= 3, f"degenerate repetition: {text!r}"


@torch.no_grad()
def test_validation_perplexity_far_below_uniform(model: LlamaForCausalLM,
                                                 tok: Tokenizer) -> None:
    train = load_train_module()
    _, val_docs = train.split_documents(0.05, seed=0)
    val_ids = train.encode_corpus(tok, val_docs)  # [N]
    loss = train.evaluate(model, val_ids[: 16 * 256 + 1], 256)
    ppl = math.exp(loss)
    vocab = tok.get_vocab_size()
    assert ppl < vocab / 4, f"validation perplexity {ppl:.1f} vs uniform {vocab}"


def test_pdserve_reads_the_config() -> None:
    from engine.config import load_config

    cfg = load_config(str(MODEL_DIR))
    raw = json.loads((MODEL_DIR / "config.json").read_text())
    assert cfg.architecture == "LlamaForCausalLM"
    assert (cfg.num_heads, cfg.num_kv_heads) == (raw["num_attention_heads"], raw["num_key_value_heads"])
    assert cfg.eos_token_ids == (raw["eos_token_id"],)
    assert cfg.torch_dtype == raw["torch_dtype"]
    assert cfg.tie_word_embeddings
