"""Decode step time of an int8 weight-only model vs fp32 on the SmolLM-135M shape (CPU).

    python benchmarks/quant_decode.py [--model-dir DIR] [--batches 1 32] [--context 64]
                                      [--variants fp32 int8 int8:dequant] [--threads 1]

Writes a random-weight SmolLM-135M-shaped checkpoint (`engine.make_model`, size "small") unless
--model-dir is given, loads it once per variant through `build_model` (int8 through the loader's
per-layer hook), then times one decode step (every sequence adds 1 token after `--context` cached
tokens): the decoder stack (`model.forward`) and the fp32 `lm_head` (`compute_logits`) apart.
Variants are timed interleaved step by step; medians are printed.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable

import torch
from torch import nn

from engine.attention import AttnMetadata
from engine.kv_cache import CacheConfig, allocate_kv
from engine.make_model import make_model
from engine.model import LlamaModel, build_model
from engine.quant import Int8Linear, QuantConfig, quantize_layer_fn, weight_bytes


def load_variant(model_dir: str, variant: str) -> tuple[LlamaModel, float]:
    """'fp32' | 'int8' (auto kernel) | 'int8:<kernel>' -> (model, load seconds)."""
    method, _, kernel = variant.partition(":")
    hook: Callable[[nn.Module], None] | None = None
    if method == "int8":
        hook = quantize_layer_fn(QuantConfig("int8", int8_kernel=kernel or "auto"))
    elif method != "fp32":
        raise ValueError(f"unknown variant {variant!r}")
    t0 = time.perf_counter()
    model = build_model(model_dir, torch.float32, quantize_layer=hook)
    return model, time.perf_counter() - t0


def decode_meta(batch: int, context: int, block_size: int) -> AttnMetadata:
    """Each sequence owns its own blocks and adds token number `context` (0-based)."""
    per_seq = context // block_size + 1
    tables = torch.arange(batch * per_seq, dtype=torch.int64).view(batch, per_seq)  # [B, nb]
    slots = tables[:, context // block_size] * block_size + context % block_size  # [B]
    return AttnMetadata([1] * batch, [context + 1] * batch, tables, slots)


def time_steps(
    models: dict[str, LlamaModel], batch: int, context: int, steps: int, clock: Callable[[], float]
) -> dict[str, tuple[float, float]]:
    """Median ms of (model.forward, compute_logits) per variant, interleaved."""
    cfg = next(iter(models.values())).config
    cache = CacheConfig(block_size=16, num_blocks=batch * (context // 16 + 1))
    kv = allocate_kv(cfg, cache, 1, torch.float32, "cpu")
    meta = decode_meta(batch, context, cache.block_size)
    ids = torch.randint(0, 1000, (batch,))
    pos = torch.full((batch,), context, dtype=torch.int64)
    fwd: dict[str, list[float]] = {k: [] for k in models}
    logit: dict[str, list[float]] = {k: [] for k in models}
    for step in range(steps + 2):
        for name, model in models.items():
            t0 = clock()
            hidden = model(ids, pos, meta, kv)  # [B, D]
            t1 = clock()
            model.compute_logits(hidden)  # [B, V]
            t2 = clock()
            if step >= 2:  # first two steps warm up
                fwd[name].append((t1 - t0) * 1e3)
                logit[name].append((t2 - t1) * 1e3)
    return {k: (statistics.median(fwd[k]), statistics.median(logit[k])) for k in models}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-dir")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--context", type=int, default=64)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument(
        "--clock",
        choices=["cpu", "wall"],
        default="cpu",
        help="cpu: this thread's CPU time (robust on a shared box; needs --threads 1), wall: elapsed",
    )
    ap.add_argument("--variants", nargs="+", default=["fp32", "int8", "int8:dequant"])
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    clock = time.thread_time if args.clock == "cpu" else time.perf_counter
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model_dir or str(make_model(tmp, size="small"))
        models, loads = {}, {}
        for v in args.variants:
            models[v], loads[v] = load_variant(model_dir, v)
        print(
            f"threads={args.threads} clock={args.clock} context={args.context} steps={args.steps} (median ms)"
        )
        for v, m in models.items():
            kernels = sorted({mod.kernel for mod in m.modules() if isinstance(mod, Int8Linear)})
            print(
                f"{v}: weight_bytes={weight_bytes(m) / 2**20:.1f} MiB load={loads[v]:.1f}s "
                f"kernels={kernels or ['fp32 F.linear']}"
            )
        print("\n| variant | batch | decoder stack ms | lm_head ms | step ms | step vs fp32 |")
        print("|---|---|---|---|---|---|")
        with torch.inference_mode():
            for b in args.batches:
                res = time_steps(models, b, args.context, args.steps, clock)
                base = sum(res[args.variants[0]])
                for v, (f, lg) in res.items():
                    print(
                        f"| {v} | {b} | {f:.2f} | {lg:.2f} | {f + lg:.2f} | {(f + lg) / base:.2f} |",
                        flush=True,
                    )


if __name__ == "__main__":
    main()
