"""int8 x fp32-activation matmul candidates vs fp32 `F.linear` on this CPU (SmolLM-135M layer shapes).

    python benchmarks/int8_matmul_cpu.py [--threads 1] [--rounds 15] [--no-compile] [--cold-mib 128]

Prints one markdown table of median microseconds per call (all kernels timed in the same run,
interleaved round by round so machine load hits them alike), then the relative output error of each
kernel against fp32 with the unquantized weight.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F

from engine.quant_kernels import INT8_KERNELS, quantize_int8

SHAPES = [
    (576, 576),
    (192, 576),
    (1536, 576),
    (576, 1536),
]  # (out N, in K): q/o, k/v, gate/up, down
Fn = Callable[[], torch.Tensor]


def median_us(
    fns: dict[str, Fn], rounds: int, calls: int, clock: Callable[[], float]
) -> dict[str, float]:
    """Median over rounds of the mean time per call, kernels interleaved within each round."""
    for fn in fns.values():
        for _ in range(3):
            fn()
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = clock()
            for _ in range(calls):
                fn()
            samples[name].append((clock() - t0) / calls * 1e6)
    return {k: statistics.median(v) for k, v in samples.items()}


def chunked_dequant(
    x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, buf: torch.Tensor
) -> torch.Tensor:
    """Dequantize 64 output rows at a time into a reused (L1/L2-resident) fp32 buffer."""
    out = torch.empty(x.shape[0], q.shape[0])  # [M, N]
    rows = buf.shape[0]
    for i in range(0, q.shape[0], rows):
        b = buf[: min(rows, q.shape[0] - i)]  # [r, K]
        b.copy_(q[i : i + rows])
        torch.mm(x, b.t(), out=out[:, i : i + rows])
    return out * scale


def fbgemm_dynamic(w: torch.Tensor, scale: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """torch.ao dynamic quantized linear (int8 weight, per-tensor int8 activations, deprecated API)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        zero = torch.zeros(w.shape[0], dtype=torch.long)
        qw = torch.quantize_per_channel(w, scale.double(), zero, 0, torch.qint8)
        packed = torch.ops.quantized.linear_prepack(qw, None)
    return lambda x: torch.ops.quantized.linear_dynamic(x, packed, True)


def candidates(
    x: torch.Tensor, w: torch.Tensor, compiled: Callable[..., torch.Tensor] | None
) -> dict[str, Fn]:
    q, scale = quantize_int8(w)  # [N, K] int8, [N]
    lowp = scale.to(torch.bfloat16)
    w_bf16, buf = w.to(torch.bfloat16), torch.empty(64, w.shape[1])
    fns: dict[str, Fn] = {
        "fp32": lambda: F.linear(x, w),
        "bf16_weight(2x mem)": lambda: F.linear(x.to(torch.bfloat16), w_bf16).float(),
        "aten_int8pack_fp32": lambda: torch.ops.aten._weight_int8pack_mm(x, q, scale),
        "chunked_dequant": lambda: chunked_dequant(x, q, scale, buf),
        "fbgemm_dyn_w8a8": (lambda f: lambda: f(x))(fbgemm_dynamic(w, scale)),
    }
    for name, kernel in INT8_KERNELS.items():
        fns[name] = (lambda k: lambda: k(x, q, scale, lowp))(kernel)
    if compiled is not None:
        fns["compiled_dequant"] = lambda: compiled(x, q, scale, lowp)
    return fns


def cycling(fns: list[Fn]) -> Fn:
    """Each call runs the next copy: with enough copies every weight comes from DRAM, not cache."""
    it = itertools.cycle(fns)
    return lambda: next(it)()


def compile_times(
    shapes: list[tuple[int, int]], batches: list[int]
) -> tuple[Callable[..., torch.Tensor], dict]:
    torch._dynamo.config.recompile_limit = 64  # one graph per (shape, batch)
    compiled = torch.compile(INT8_KERNELS["dequant"], dynamic=False)
    seconds = {}
    for n, k in shapes:
        for m in batches:
            q, scale = quantize_int8(torch.randn(n, k))
            t0 = time.perf_counter()
            compiled(torch.randn(m, k), q, scale, scale.to(torch.bfloat16))
            seconds[(n, k, m)] = time.perf_counter() - t0
    return compiled, seconds


def error_table(batch: int) -> dict[str, float]:
    errs: dict[str, list[float]] = {}
    for n, k in SHAPES:
        w, x = torch.randn(n, k) * 0.05, torch.randn(batch, k)
        ref = F.linear(x, w)
        for name, fn in candidates(x, w, None).items():
            errs.setdefault(name, []).append(((fn() - ref).norm() / ref.norm()).item())
    return {k: max(v) for k, v in errs.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument(
        "--clock",
        choices=["cpu", "wall"],
        default="cpu",
        help="cpu: this thread's CPU time (robust on a shared box; needs --threads 1), wall: elapsed",
    )
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument(
        "--cold-mib",
        type=int,
        default=0,
        help="cycle through copies of each weight totalling this many fp32 MiB (> L3: DRAM-bound "
        "like a real decode step, which streams every layer's weights once); 0 = one hot copy",
    )
    ap.add_argument("--only", nargs="+", help="time only these columns (fp32 is always kept)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    clock = time.thread_time if args.clock == "cpu" else time.perf_counter
    torch.manual_seed(0)
    print(
        f"torch {torch.__version__}, cpu capability {torch.backends.cpu.get_cpu_capability()}, "
        f"avx512_bf16={torch.cpu._is_avx512_bf16_supported()}, vnni={torch.cpu._is_vnni_supported()}, "
        f"threads {args.threads}, clock {args.clock}, rounds {args.rounds}, cold_mib {args.cold_mib}"
    )
    compiled, ctimes = (None, {}) if args.no_compile else compile_times(SHAPES, args.batches)
    header = None
    for n, k in SHAPES:
        for m in args.batches:
            x = torch.randn(m, k)
            copies = 1 if args.cold_mib == 0 else -(-args.cold_mib * 2**20 // (n * k * 4))
            keep = {"fp32", "cpu_auto", *(args.only or [])}
            per_copy = [candidates(x, torch.randn(n, k) * 0.05, compiled) for _ in range(copies)]
            fns = {
                name: cycling([c[name] for c in per_copy])
                for name in per_copy[0]
                if not args.only or name in keep
            }
            res = median_us(fns, args.rounds, max(4, 64 // m), clock)
            if header is None:
                header = list(res)
                print("\n| N x K | M | " + " | ".join(header) + " | cpu_auto/fp32 |")
                print("|---" * (len(header) + 3) + "|")
            ratio = res["cpu_auto"] / res["fp32"]
            cells = " | ".join(f"{res[h]:.1f}" for h in header)
            print(f"| {n}x{k} | {m} | {cells} | {ratio:.2f} |", flush=True)
    if ctimes:
        print(
            "\ntorch.compile first-call seconds:",
            {f"{a}x{b}/M{c}": round(s, 1) for (a, b, c), s in ctimes.items()},
        )
    for m in args.batches:
        print(
            f"\nmax relative error vs fp32 weights (M={m}):",
            {k: f"{v:.4f}" for k, v in error_table(m).items()},
        )


if __name__ == "__main__":
    main()
