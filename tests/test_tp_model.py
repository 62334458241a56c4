"""TP=2 through two real processes (gloo) gives TP=1's logits, prefill chunks and decode alike."""

from __future__ import annotations

import os
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
