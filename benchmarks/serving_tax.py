"""The serving tax (issue 14): CPU seconds per generated token of a whole served cluster against the
offline engine (`engine.LLM`) alone, on the same workload, measured side by side.

    python benchmarks/serving_tax.py [--requests 64] [--max-tokens 32] [--concurrency 16] [--prefill-tp 1]
                                     [--model DIR | --small]

Workload: --requests distinct prompts, greedy, --max-tokens each with ignore_eos (every request
generates exactly that many tokens), the embedded default model (or --model, or with --small a
random SmolLM-135M-shaped checkpoint written by engine.make_model), float32.
  engine:  engine.LLM in a child process generates them all in one call, at most --concurrency
           sequences at once (max_num_seqs: the batch the cluster sees, since a decode step costs
           about the same at any small batch); its CPU time (time.process_time: every thread of
           the process) around the call.
  cluster: `pdserve up deploy/examples/local-cpu.yaml` (prefill TP --prefill-tp), warmed with two
           requests, then the requests sent --concurrency at a time from this process; the CPU time
           of every process of the cluster (Ray's daemons included, and apart) over the run, and
           per process (where the tax goes).
Goal: cluster / engine <= 1.3.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.loadgen.idle import TICKS, command, cpu_ticks, descendants, is_pdserve, pdserve_up  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = str(ROOT / "deploy" / "examples" / "local-cpu.yaml")

ENGINE_SCRIPT = """
import json, sys, time
import torch
torch.set_num_threads(1)
from engine import LLM, SamplingParams
prompts, max_tokens, model, batch = json.loads(sys.argv[1]), int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
llm = LLM(model, dtype="float32", max_num_seqs=batch)
params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
llm.generate(prompts[:2], params)  # warm-up, as the cluster gets
t0, c0 = time.perf_counter(), time.process_time()
outs = llm.generate(prompts, params)
print(json.dumps({"cpu_s": time.process_time() - c0, "wall_s": time.perf_counter() - t0,
                  "tokens": sum(len(o.token_ids) for o in outs)}))
"""


def prompts(n: int) -> list[str]:
    return [f"Request {i}: the for statement and the while statement differ in" for i in range(n)]


def engine_run(args: argparse.Namespace) -> dict[str, float]:
    out = subprocess.run([sys.executable, "-c", ENGINE_SCRIPT, json.dumps(prompts(args.requests)),
                          str(args.max_tokens), args.model, str(args.concurrency)], cwd=ROOT, capture_output=True, text=True, check=True)
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def cluster_run(args: argparse.Namespace) -> dict[str, Any]:
    from router.client import generate

    up = [EXAMPLE, "--set", f"router.port={args.port}", "--set", f"prefill.tensor_parallel_size={args.prefill_tp}",
          "--set", f"model.path={args.model}"]
    with pdserve_up(up) as (proc, address):
        def one(prompt: str) -> int:
            done = generate(address, prompt, timeout=300, max_tokens=args.max_tokens, temperature=0.0,
                            ignore_eos=True)
            return len(done.token_ids)

        for p in prompts(2):
            one(p)
        pids = descendants(proc.pid)
        before = {pid: cpu_ticks(pid) for pid in pids}
        t0 = time.perf_counter()
        with ThreadPoolExecutor(args.concurrency) as pool:
            tokens = sum(pool.map(one, prompts(args.requests)))
        wall = time.perf_counter() - t0
        used = {pid: max(0, cpu_ticks(pid) - before[pid]) / TICKS for pid in pids}
        mine = sum(s for pid, s in used.items() if is_pdserve(pid, proc.pid, command(pid)))
        rows = sorted(((s, command(pid)[:72]) for pid, s in used.items()), reverse=True)
    return {"cpu_s": sum(used.values()), "pdserve_cpu_s": mine, "wall_s": wall, "tokens": tokens,
            "processes": [{"cpu_s": s, "command": c} for s, c in rows]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--prefill-tp", type=int, default=1)
    parser.add_argument("--port", type=int, default=50072)
    model = parser.add_mutually_exclusive_group()
    model.add_argument("--model", default=None, help="checkpoint dir (default: the embedded default model)")
    model.add_argument("--small", action="store_true", help="a random SmolLM-135M-shaped checkpoint")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if args.small:
            from engine.make_model import make_model

            args.model = str(make_model(Path(tmp) / "small", "llama", "small"))
        elif args.model is None:
            from deploy.config import DEFAULT_MODEL_DIR

            args.model = str(DEFAULT_MODEL_DIR)
        run(args)


def run(args: argparse.Namespace) -> None:
    engine = engine_run(args)
    cluster = cluster_run(args)
    per_token_engine = engine["cpu_s"] / engine["tokens"]
    per_token_cluster = cluster["cpu_s"] / cluster["tokens"]
    per_token_pdserve = cluster["pdserve_cpu_s"] / cluster["tokens"]
    print(f"engine.LLM         {engine['tokens']:5.0f} tokens  {engine['cpu_s']:7.2f} CPU s  "
          f"{1000 * per_token_engine:6.2f} CPU ms/token  ({engine['wall_s']:.1f} s wall)")
    print(f"cluster (all)      {cluster['tokens']:5.0f} tokens  {cluster['cpu_s']:7.2f} CPU s  "
          f"{1000 * per_token_cluster:6.2f} CPU ms/token  ({cluster['wall_s']:.1f} s wall)")
    print(f"cluster (pdserve)  {cluster['tokens']:5.0f} tokens  {cluster['pdserve_cpu_s']:7.2f} CPU s  "
          f"{1000 * per_token_pdserve:6.2f} CPU ms/token")
    print(f"serving tax: {per_token_cluster / per_token_engine:.2f}x (whole cluster), "
          f"{per_token_pdserve / per_token_engine:.2f}x (pdserve's processes)")
    for row in cluster["processes"][:8]:
        print(f"   {row['cpu_s']:6.2f} CPU s  {row['command']}")
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        name = "serving_tax_small.json" if args.small else "serving_tax.json"
        (args.out / name).write_text(json.dumps({"engine": engine, "cluster": cluster}, indent=2) + "\n")


if __name__ == "__main__":
    main()
