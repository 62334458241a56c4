"""Engine throughput: pdserve's continuous-batching engine vs transformers.generate in static batches.

Workload (seeded): N requests with prompt lengths in [32, 512] and output lengths in [16, 256]
(ignore_eos, so every request produces exactly its output length). Both sides run in the same
process, same threads, same fp32 checkpoint (SmolLM-135M shape from engine.make_model, random weights).

Also: decode step time at batch 1 vs the memory roofline (weight bytes read per step / copy
bandwidth measured in the same run). Every timing is a median of repeats where it is repeated.

    python benchmarks/engine_throughput.py            # full run (64 requests)
    python benchmarks/engine_throughput.py --quick    # smoke run
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from engine import LLM, SamplingParams
from engine.make_model import make_model


@dataclass(frozen=True, slots=True)
class Workload:
    prompts: list[list[int]]
    output_lens: list[int]


def make_workload(n: int, prompt_range: tuple[int, int], output_range: tuple[int, int], seed: int) -> Workload:
    g = torch.Generator().manual_seed(seed)
    plens = torch.randint(prompt_range[0], prompt_range[1] + 1, (n,), generator=g).tolist()
    olens = torch.randint(output_range[0], output_range[1] + 1, (n,), generator=g).tolist()
    prompts = [torch.randint(1, 1000, (p,), generator=g).tolist() for p in plens]
    return Workload(prompts, olens)


def run_pdserve(llm: LLM, w: Workload) -> float:
    params = [SamplingParams(max_tokens=n, ignore_eos=True) for n in w.output_lens]
    start = time.perf_counter()
    outs = llm.generate(w.prompts, params)
    elapsed = time.perf_counter() - start
    assert [len(o.token_ids) for o in outs] == w.output_lens
    return elapsed


def run_hf(model: torch.nn.Module, w: Workload, batch_size: int) -> float:
    """Static batches in arrival order, left-padded; each batch runs to its longest output."""
    start = time.perf_counter()
    for i in range(0, len(w.prompts), batch_size):
        prompts, olens = w.prompts[i : i + batch_size], w.output_lens[i : i + batch_size]
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])  # [B, S] left-padded
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        with torch.no_grad():
            out = model.generate(  # type: ignore[operator]
                input_ids=ids, attention_mask=mask, do_sample=False,
                max_new_tokens=max(olens), min_new_tokens=max(olens), pad_token_id=0,
            )
        assert out.shape[1] == width + max(olens)
    return time.perf_counter() - start


def copy_bandwidth(nbytes: int = 256 << 20, repeats: int = 5) -> float:
    """Bytes moved per second (read + write) by a large tensor copy."""
    src = torch.ones(nbytes // 4)
    dst = torch.empty_like(src)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - t)
    return 2 * nbytes / statistics.median(times)


def weight_bytes_per_step(model: torch.nn.Module) -> int:
    """Every weight is read once per decode step (a tied embedding counts once, as the lm_head)."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel() * p.element_size()
    return total


def decode_step_times(llm: LLM, prompt_len: int, steps: int) -> list[float]:
    """Wall time of each pure decode step of one request (batch 1)."""
    engine = llm.engine
    engine.add_request("bs1", list(range(1, prompt_len + 1)), SamplingParams(max_tokens=steps, ignore_eos=True))
    times = []
    first = True
    while engine.has_work():
        t = time.perf_counter()
        engine.step()
        if not first:
            times.append(time.perf_counter() - t)
        first = False
    return times


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small smoke run")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--hf-batch", type=int, default=16, help="transformers static batch size")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    ap.add_argument("--model", default="", help="existing checkpoint dir (default: write a small one)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        w = make_workload(8, (32, 64), (8, 16), args.seed)
        hf_batch, bs1_steps = 4, 8
    else:
        w = make_workload(args.requests, (32, 512), (16, 256), args.seed)
        hf_batch, bs1_steps = args.hf_batch, 64
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model or str(make_model(Path(tmp) / "small", size="small", seed=args.seed))
        report(model_dir, w, hf_batch, bs1_steps)
    return 0


def report(model_dir: str, w: Workload, hf_batch: int, bs1_steps: int) -> None:
    from transformers import AutoModelForCausalLM

    n_out = sum(w.output_lens)
    print(f"threads={torch.get_num_threads()} requests={len(w.prompts)} "
          f"prompt_tokens={sum(len(p) for p in w.prompts)} output_tokens={n_out}")
    llm = LLM(model_dir, dtype="float32", max_num_seqs=64, max_num_batched_tokens=512)
    print(f"pdserve: {llm.engine.num_total_blocks} KV blocks of {llm.engine.cache_config.block_size}")
    t_pd = run_pdserve(llm, w)
    print(f"pdserve engine:        {t_pd:8.2f} s  {n_out / t_pd:8.1f} output tok/s "
          f"(preemptions {llm.engine.num_preemptions})")
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None
    t_hf = run_hf(hf, w, hf_batch)
    print(f"transformers (bs={hf_batch:3d}): {t_hf:8.2f} s  {n_out / t_hf:8.1f} output tok/s")
    print(f"throughput ratio pdserve / transformers: {t_hf / t_pd:.2f}x (goal >= 2x)")
    del hf
    step = statistics.median(decode_step_times(llm, 32, bs1_steps))
    wbytes = weight_bytes_per_step(llm.engine.model)
    bw = copy_bandwidth()
    roof = wbytes / bw
    print(f"decode step, batch 1:  median {step * 1e3:7.2f} ms over {bs1_steps - 1} steps")
    print(f"roofline: {wbytes / 2**20:.0f} MiB weights / {bw / 1e9:.1f} GB/s copy bandwidth "
          f"= {roof * 1e3:.2f} ms  -> {roof / step:.2f} of the roofline (goal >= 0.5)")


if __name__ == "__main__":
    raise SystemExit(main())
