"""TP=2 through two real processes (gloo) gives TP=1's logits, prefill chunks and decode alike."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from engine.model import LlamaModel, build_model
from engine.tp import TPInfo
from tests.checkpoints import PagedRunner, write_hf_checkpoint

TP_KINDS = ("llama", "qwen2", "mistral", "llama_tied_rope3")
WORLD = 2


def _tokens(n: int, seed: int) -> list[int]:
    return torch.randint(1, 1000, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _run(model: LlamaModel) -> dict[str, torch.Tensor]:
    """Whole-prompt prefill of "a", chunked prefill of "b", then batched decode of both."""
    runner = PagedRunner(model, seed=3)
    a, b = _tokens(14, 1), _tokens(16, 2)
    out = {"a_prefill": runner.step([("a", a)])[0]}
    b_chunks = [runner.step([("b", b[i : i + 5])])[0] for i in range(0, 15, 5)]
    out["b_prefill"] = torch.cat(b_chunks)
    for step, (ta, tb) in enumerate(zip(_tokens(4, 3), _tokens(4, 4), strict=True)):
        la, lb = runner.step([("a", [ta]), ("b", [tb])])
        out[f"a_decode{step}"], out[f"b_decode{step}"] = la, lb
    return out


def _worker(rank: int, store_dir: str, ckpt_dirs: list[str], out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{store_dir}/store", rank=rank, world_size=WORLD
    )
    try:
        tp = TPInfo(rank=rank, world_size=WORLD, group=dist.group.WORLD)
        for ckpt in ckpt_dirs:
            model = build_model(ckpt, torch.float32, tp)
            assert model.decoder_layers()[0].self_attn.num_kv_heads == 1
            save_file(_run(model), f"{out_dir}/{Path(ckpt).name}_rank{rank}.safetensors")
    finally:
        dist.destroy_process_group()
    # Done and saved: leave without running C++ static destructors, where gloo's threads once
    # raced the exit ("terminate called without an active exception", SIGABRT) after a clean run.
    os._exit(0)


@pytest.mark.timeout(300)
def test_tp2_matches_tp1(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    ckpts = [str(write_hf_checkpoint(tmp_path / kind, kind)) for kind in TP_KINDS]
    mp.spawn(_worker, args=(str(tmp_path), ckpts, str(tmp_path)), nprocs=WORLD, join=True)
    for ckpt in ckpts:
        ref = _run(build_model(ckpt, torch.float32))
        for rank in range(WORLD):
            got = load_file(str(tmp_path / f"{Path(ckpt).name}_rank{rank}.safetensors"))
            assert got.keys() == ref.keys()
            for key, value in ref.items():
                torch.testing.assert_close(got[key], value, atol=1e-5, rtol=0, msg=f"{ckpt} {key}")


def test_tp_checks_and_replicated_kv_slices(hf_checkpoint: Callable[[str], Path]) -> None:
    """tp must divide the heads; the KV heads must divide tp or tp them; rank r's k/v rows are
    KV head r * kv // tp when tp exceeds the KV heads."""
    import dataclasses

    from engine import LLM
    from engine.config import CheckpointError, load_config
    from engine.tp import check_tp, kv_head_range, shard_range

    path = hf_checkpoint("llama")
    with pytest.raises(CheckpointError, match="'num_attention_heads' = 4 is not divisible by tensor_parallel_size = 3"):
        LLM(str(path), tensor_parallel_size=3)  # refused before any rank starts
    cfg = load_config(path)  # 4 heads, 2 KV heads, head_dim 16
    check_tp(cfg, 4)
    with pytest.raises(CheckpointError, match="'num_key_value_heads' = 3: 2 ranks cannot share 3 KV heads"):
        check_tp(dataclasses.replace(cfg, num_kv_heads=3, num_heads=6), 2)
    assert [list(kv_head_range(2, 4, r)) for r in range(4)] == [[0], [0], [1], [1]]
    assert [list(kv_head_range(8, 2, r)) for r in range(2)] == [list(range(4)), list(range(4, 8))]
    tp = TPInfo(rank=3, world_size=4, group=None)
    assert shard_range("layers.0.self_attn.k_proj.weight", 32, cfg, tp) == (16, 16)  # head 1
    assert shard_range("layers.0.self_attn.q_proj.weight", 64, cfg, tp) == (48, 16)
    assert shard_range("layers.0.mlp.down_proj.weight", 128, cfg, tp) == (96, 32)
