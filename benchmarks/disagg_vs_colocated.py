"""Prefill/decode interference: disaggregated vs colocated on the same cores, model and workload.

    python benchmarks/disagg_vs_colocated.py [--rates 0.75,1.5] [--num-requests 40] [--out DIR]

Both deployments get the same two cores (--cores, default 0,1) and the same model:
  disaggregated: one prefill replica (TP=1) pinned to core A, one decode replica pinned to core B,
                 KV moved over UCX;
  colocated:     two colocated replicas (`serving_mode: colocated`), each pinned to both cores; each
                 engine chunk-prefills new prompts (--chunk tokens per step) between decode steps,
                 as a plain vLLM server does.
Each is started with `pdserve up` in its own process and loaded with `pdserve bench` code
(benchmarks.loadgen): the mixed dataset (long-prompt/short-answer and short-prompt/long-answer
requests, seeded) as Poisson arrivals at each --rates value. Reported: p99 ITL and goodput at the
TTFT+TPOT SLO per rate, their disaggregated/colocated ratios, and goodput at tighter and looser
SLOs (the SLO scaled by 0.5..4, from the same records). The router and the bench client are not
pinned: they share the cores with the workers in both runs alike.

Model: --model DIR, else engine/default_model when it holds the workload's longest request, else a
random-weight Llama of its shape with 2048 positions (hidden 256, 4 layers, 8 heads, 4 KV heads)
written with engine.make_model's parts. A workload whose longest request (prompt + answer, after the
dataset's length jitter) does not fit the model is refused before anything starts: the server would
refuse those requests and the ratios would be computed from the short ones alone.

Failed requests count against goodput (they are not good) and are printed first; a repeat in which
any request failed gets no ratios ("ratios_withheld" says why).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.loadgen.config import SLO, BenchConfig, DatasetConfig, Load  # noqa: E402
from benchmarks.loadgen.report import format_table, write_json  # noqa: E402
from benchmarks.loadgen.runner import RunResult, run_bench  # noqa: E402
from benchmarks.loadgen.stats import meets_slo, percentile  # noqa: E402
from deploy.config import DEFAULT_MODEL_DIR  # noqa: E402
from engine.config import load_config as load_model_config  # noqa: E402

MODES = ("disaggregated", "colocated")
SLO_SCALES = (0.5, 1.0, 2.0, 4.0)
BENCH_SHAPE = dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=8,
                   num_key_value_heads=4, head_dim=32, max_position_embeddings=2048)


def longest_request(args: argparse.Namespace, range_ratio: float) -> int:
    """Tokens of the mixed workload's longest request: a long prompt with a short answer, or a
    short prompt with a long answer, each length at the top of its jitter."""
    def top(n: int) -> int:
        return max(1, round(n * (1 + range_ratio)))
    return max(top(args.input_len) + top(args.short_len), top(args.short_len) + top(args.output_len))


def model_dir(scratch: Path, args: argparse.Namespace, needed: int) -> str:
    """--model, else engine/default_model if it holds `needed` tokens, else a random model of its
    shape with 2048 positions. Exits with a message when the chosen model cannot hold the workload."""
    if args.model:
        return _holding(args.model, needed)
    default = Path(DEFAULT_MODEL_DIR)
    if (default / "config.json").exists() and load_model_config(str(default)).max_position_embeddings >= needed:
        return str(default)
    print("a random model of engine/default_model's shape with 2048 positions", file=sys.stderr)
    return _holding(_random_model(scratch), needed)


def _holding(model: str, needed: int) -> str:
    positions = load_model_config(model).max_position_embeddings
    if positions < needed:
        sys.exit(f"disagg_vs_colocated: the workload's longest request is {needed} tokens but {model} holds "
                 f"{positions}: lower --input-len/--output-len or pass a longer --model")
    return model


def _random_model(scratch: Path) -> str:
    from engine.make_model import config_json, random_weights, write_safetensors, write_tokenizer

    d = scratch / "model"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(config_json("llama", "tiny") | BENCH_SHAPE))
    (d / "generation_config.json").write_text(json.dumps({"bos_token_id": 0, "eos_token_id": 0}))
    write_tokenizer(d)
    write_safetensors(d, random_weights(d, 0), None)
    return str(d)


def deploy_yaml(mode: str, model: str, cores: Sequence[int], chunk: int) -> dict[str, Any]:
    """The pdserve YAML of one side of the comparison (same model, cores, KV and chunk size)."""
    a, b = cores
    common: dict[str, Any] = {
        "model": {"path": model},
        "router": {"port": 0, "heartbeat_seconds": 2.0},  # a busy box delays heartbeats
        "prefill": {"tensor_parallel_size": 1, "max_num_batched_tokens": chunk, "num_kv_blocks": 1024,
                    "cpu_affinity": [a], "resources": {"num_cpus": 0.25}},
        "decode": {"replicas": 1, "num_kv_blocks": 1024, "cpu_affinity": [b],
                   "resources": {"num_cpus": 0.25}},
    }
    if mode == "colocated":
        common["serving_mode"] = "colocated"
        common["decode"] |= {"replicas": 2, "cpu_affinity": [a, b]}
    return common


@contextmanager
def pdserve_up(config: Path, attempts: int = 3) -> Iterator[str]:
    """`pdserve up CONFIG` in its own process (its own Ray); yields the router's address. Retried:
    on a box shared with other jobs, Ray's start sometimes times out."""
    cli = "import sys; from deploy.cli import main; sys.exit(main())"
    env = {"RAY_raylet_start_wait_time_s": "120", **os.environ, "GRPC_VERBOSITY": "ERROR"}
    for attempt in range(1, attempts + 1):
        proc = subprocess.Popen([sys.executable, "-c", cli, "up", str(config)], stdout=subprocess.PIPE,
                                text=True, env=env)
        address = next((line.split()[4] for line in proc.stdout or ()
                        if line.startswith("pdserve router listening on ")), None)
        if address is not None:
            break
        print(f"pdserve up exited with {proc.wait()} (attempt {attempt} of {attempts})", file=sys.stderr)
    else:
        raise RuntimeError(f"pdserve up failed {attempts} times")
    try:
        yield address
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(120)
        except subprocess.TimeoutExpired:
            proc.kill()


def failures(runs: list[RunResult]) -> str:
    """A line per run with failed requests (first error shown), before anything else is read."""
    lines = []
    for r in runs:
        bad = [rec for rec in r.records if not rec.ok]
        if bad:
            lines.append(f"!! FAILED {len(bad)} of {len(r.records)} requests at {r.load.label}: {bad[0].error}\n")
    return "".join(lines)


def good_per_s(result: RunResult, slo: SLO) -> float:
    good = sum(meets_slo(r, slo) for r in result.records)
    return good / result.stats.duration_s if result.stats.duration_s > 0 else 0.0


def scaled(slo: SLO, k: float) -> SLO:
    return SLO(None if slo.ttft_ms is None else k * slo.ttft_ms, None if slo.tpot_ms is None else k * slo.tpot_ms)


def run_row(r: RunResult, slo: SLO) -> dict[str, Any]:
    s = r.stats
    itls = [1000 * g for rec in r.records if rec.ok for g in rec.itls()]
    return {"rate": r.load.rate, "completed": s.completed, "failed": s.failed,
            "itl_ms_p50": s.itl_ms["p50"], "itl_ms_p99": s.itl_ms["p99"],
            "itl_ms_p999": percentile(itls, 99.9),
            "itl_over_50ms_fraction": sum(g > 50 for g in itls) / len(itls) if itls else None,
            "ttft_ms_p50": s.ttft_ms["p50"], "ttft_ms_p99": s.ttft_ms["p99"],
            "tpot_ms_p50": s.tpot_ms["p50"], "tpot_ms_p99": s.tpot_ms["p99"],
            "goodput": s.goodput, "good_fraction": s.good_fraction,
            "request_throughput": s.request_throughput,
            "goodput_by_slo_scale": {str(k): good_per_s(r, scaled(slo, k)) for k in SLO_SCALES},
            "client_cpu_utilization": r.overhead.cpu_utilization}


def compare(rows: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Per rate: p99 ITL colocated / disaggregated and goodput disaggregated / colocated."""
    out = []
    for d, c in zip(rows["disaggregated"], rows["colocated"], strict=True):
        out.append({
            "rate": d["rate"],
            "itl_p99_ratio": c["itl_ms_p99"] / d["itl_ms_p99"] if d["itl_ms_p99"] else None,
            "itl_p999_ratio": c["itl_ms_p999"] / d["itl_ms_p999"] if d["itl_ms_p999"] else None,
            "goodput_ratio": d["goodput"] / c["goodput"] if c["goodput"] else None,
            "goodput_ratio_by_slo_scale": {
                k: (d["goodput_by_slo_scale"][k] / c["goodput_by_slo_scale"][k]
                    if c["goodput_by_slo_scale"][k] else None) for k in d["goodput_by_slo_scale"]},
        })
    return out


def plot(results: dict[str, list[RunResult]], out: Path, suffix: str = "") -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for mode, runs in results.items():
        for r in runs:
            itl = sorted(1000 * g for rec in r.records if rec.ok for g in rec.itls())
            ys = [(i + 1) / len(itl) for i in range(len(itl))]
            axes[0].plot(itl, ys, label=f"{mode} @ {r.load.rate:g} req/s")
        axes[1].plot([r.load.rate for r in runs], [r.stats.goodput for r in runs], marker="o", label=mode)
    axes[0].set_xscale("log")
    axes[0].set(xlabel="inter-token latency (ms, log)", ylabel="CDF", title="ITL")
    axes[1].set(xlabel="offered rate (req/s)", ylabel="goodput (req/s)", title="goodput at the SLO")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = out / f"disagg_vs_colocated{suffix}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rates", default="0.75,1.5", help="Poisson request rates, req/s")
    p.add_argument("--num-requests", type=int, default=40, help="per rate")
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--input-len", type=int, default=1024, help="long prompts")
    p.add_argument("--output-len", type=int, default=128, help="long answers")
    p.add_argument("--short-len", type=int, default=16, help="short prompts and short answers")
    p.add_argument("--long-fraction", type=float, default=0.5, help="share of long-prompt requests")
    p.add_argument("--chunk", type=int, default=512, help="prefill tokens per engine step")
    p.add_argument("--cores", default="0,1")
    p.add_argument("--slo-ttft-ms", type=float, default=2000.0)
    p.add_argument("--slo-tpot-ms", type=float, default=40.0)
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--repeat", type=int, default=1, help="runs of each mode, alternating the order")
    p.add_argument("--model", default=None, help="checkpoint directory (default: see the module docstring)")
    p.add_argument("--out", default="bench-out/disagg_vs_colocated")
    return p.parse_args()


def run_mode(mode: str, model: str, scratch: Path, args: argparse.Namespace, cfg: BenchConfig) -> list[RunResult]:
    config = scratch / f"{mode}.yaml"
    config.write_text(yaml.safe_dump(deploy_yaml(mode, model, [int(c) for c in args.cores.split(",")], args.chunk)))
    with pdserve_up(config) as address:
        return asyncio.run(run_bench(dataclasses.replace(cfg, address=address)))


def main() -> None:
    args = parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    slo = SLO(args.slo_ttft_ms, args.slo_tpot_ms)
    loads = tuple(Load(float(r)) for r in args.rates.split(","))
    modes = args.modes.split(",")
    repeats: list[dict[str, Any]] = []
    results: dict[str, list[RunResult]] = {}
    with tempfile.TemporaryDirectory() as scratch:
        model = model_dir(Path(scratch), args, longest_request(args, 0.25))
        dataset = DatasetConfig("mixed", input_len=args.input_len, output_len=args.output_len,
                                short_len=args.short_len, range_ratio=0.25, long_fraction=args.long_fraction,
                                vocab_size=load_model_config(model).vocab_size)
        cfg = BenchConfig(address="", loads=loads, dataset=dataset, num_requests=args.num_requests,
                          warmup=args.warmup, slo=slo)
        for i in range(args.repeat):
            rows: dict[str, list[dict[str, Any]]] = {}
            for mode in (modes if i % 2 == 0 else modes[::-1]):
                load_before = os.getloadavg()[0]
                results[mode] = run_mode(mode, model, Path(scratch), args, cfg)
                print(f"== {mode} (repeat {i})\n{failures(results[mode])}{format_table(results[mode])}", flush=True)
                write_json(out / f"{mode}-{i}.json", dataclasses.replace(cfg, address=mode), results[mode])
                rows[mode] = [run_row(r, slo) | {"loadavg_1m_before": load_before,
                                                 "loadavg_1m_after": os.getloadavg()[0]}
                              for r in results[mode]]
            failed = sum(r["failed"] for runs in rows.values() for r in runs)
            withheld = f"{failed} requests failed" if failed else None
            repeats.append({"runs": rows, "ratios_withheld": withheld,
                            "ratios": compare(rows) if len(rows) == 2 and not failed else []})
            plot(results, out, suffix=f"-{i}")
    summary = {"model": model, "cores": args.cores, "chunk": args.chunk,
               "slo": {"ttft_ms": slo.ttft_ms, "tpot_ms": slo.tpot_ms},
               "dataset": {"input_len": args.input_len, "output_len": args.output_len, "short_len": args.short_len,
                           "long_fraction": args.long_fraction},
               "repeats": repeats}
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    print(json.dumps([r["ratios"] or r["ratios_withheld"] for r in repeats], indent=1))


if __name__ == "__main__":
    main()
