"""Chunk-wise KV streaming (issue 6): how much of the KV transfer hides behind prefill, 2k-token prompts.

    python benchmarks/kv_streaming.py [--prompt-len 2048] [--requests 8] [--chunk 256] [--payload] [--out DIR]

One prefill replica (TP=1) and one decode replica (`--pin`: on cores 0 and 1), KV over UCX,
a random-weight Llama with max_position_embeddings=4096 (written here). The same run starts the
cluster twice, `kv_transfer.streaming: false` then `true`, and sends the same prompts one at a time
(max_tokens=8, greedy, ignore_eos), timing every token at the client:

  exposed transfer = (second token - first token) - (median gap of the later tokens)

i.e. what the hand-off adds between the first token (end of prefill) and decode's first step. With
streaming off it is the whole pull plus the router -> decode hop; with streaming on only what the
last chunk's pull leaves. The raw transfer is the decode replica's pull time per request with
streaming off (Registry heartbeat counters `kv_pull_seconds / kv_pulls`). Medians; hidden fraction
= 1 - exposed(on) / exposed(off). `--payload` turns the same-host read off (the KV goes as a UCX
payload, as across hosts). Writes kv_streaming_chunk<N>[_payload].json and .png into --out.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from deploy.cluster import Cluster, LoopThread  # noqa: E402
from deploy.config import DeployConfig, parse_config  # noqa: E402
from router.client import generate_stream, get_status  # noqa: E402

MODEL: dict[str, Any] = dict(hidden_size=256, intermediate_size=768, num_hidden_layers=8, num_attention_heads=8,
             num_key_value_heads=8, vocab_size=1024, max_position_embeddings=4096,
             tie_word_embeddings=False, torch_dtype="float32")


def write_model(directory: Path) -> str:
    """A random-weight Llama of MODEL's shape (engine.make_model's writer, a longer context)."""
    from engine import make_model as mm

    directory.mkdir(parents=True, exist_ok=True)
    heads = MODEL["num_attention_heads"]
    config = {**mm.config_json("llama", "tiny"), **MODEL, "head_dim": MODEL["hidden_size"] // heads}
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    (directory / "generation_config.json").write_text(json.dumps({"bos_token_id": 0, "eos_token_id": 0}))
    mm.write_tokenizer(directory)
    mm.write_safetensors(directory, mm.random_weights(directory, 0), None)
    return str(directory)


def deploy_config(model: str, streaming: bool, chunk: int, prompt_len: int, pin: bool,
                  same_host_read: bool = True) -> DeployConfig:
    blocks = max(2 * 4096 // 16, 4 * -(-(prompt_len + 64) // 16))
    cores = ([0], [1]) if pin else ([], [])
    return parse_config({
        "model": {"path": model, "block_size": 16},
        "router": {"port": 0, "heartbeat_seconds": 5.0, "max_queued_prompt_tokens": 1 << 20},
        "prefill": {"tensor_parallel_size": 1, "num_kv_blocks": blocks, "max_num_batched_tokens": chunk,
                    "cpu_affinity": cores[0], "resources": {"num_cpus": 0.25}},
        "decode": {"num_kv_blocks": blocks, "cpu_affinity": cores[1], "resources": {"num_cpus": 0.25}},
        "kv_transfer": {"streaming": streaming, "lease_seconds": 60, "timeout_seconds": 60,
                        "same_host_read": same_host_read},
    }, "kv_streaming benchmark")


@contextmanager
def running(cfg: DeployConfig) -> Iterator[tuple[Cluster, LoopThread]]:
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    loop = LoopThread()

    async def make() -> Cluster:
        return Cluster(cfg)

    cluster = loop.run(make())
    try:
        loop.run(cluster.start(300), 330)
        wait_registered(cluster.address)
        yield cluster, loop
    finally:
        loop.run(cluster.stop(), 120)
        loop.close()


def wait_registered(address: str, within: float = 60.0) -> None:
    """Until the router knows a ready replica of each pool (start() may return before a heartbeat)."""
    end = time.monotonic() + within
    while time.monotonic() < end:
        status = get_status(address)
        if all(any(r.ready for r in pool.replicas) for pool in (status.prefill, status.decode)):
            return
        time.sleep(0.2)
    raise RuntimeError(f"no ready replicas after {within} s: {get_status(address)}")


def token_times(address: str, prompt: list[int], max_tokens: int) -> list[float]:
    """Client arrival time of every token (a message of n tokens counts n arrivals)."""
    times: list[float] = []
    for chunk in generate_stream(address, prompt, max_tokens=max_tokens, ignore_eos=True, timeout=300):
        times.extend([time.perf_counter()] * len(chunk.token_ids))
    return times


def exposed_ms(times: list[float]) -> float:
    later = [b - a for a, b in zip(times[1:], times[2:], strict=False)]
    return 1000 * ((times[1] - times[0]) - statistics.median(later))


def pull_seconds(address: str) -> tuple[float, int]:
    decode = get_status(address).decode.replicas[0]
    return decode.kv_pull_seconds, decode.kv_pulls


def measure(model: str, streaming: bool, prompts: list[list[int]], chunk: int, warmup: int,
            pin: bool, same_host_read: bool) -> dict[str, Any]:
    cfg = deploy_config(model, streaming, chunk, len(prompts[0]), pin, same_host_read)
    with running(cfg) as (cluster, _):
        for p in prompts[:warmup]:
            token_times(cluster.address, p, 8)
        time.sleep(11)  # a heartbeat with the warm-up's pulls
        seconds0, pulls0 = pull_seconds(cluster.address)
        samples = [token_times(cluster.address, p, 8) for p in prompts[warmup:]]
        time.sleep(11)
        seconds1, pulls1 = pull_seconds(cluster.address)
    exposed = [exposed_ms(t) for t in samples]
    return {"streaming": streaming, "exposed_ms": exposed, "exposed_ms_p50": statistics.median(exposed),
            "itl_ms_p50": statistics.median(1000 * (b - a) for t in samples for a, b in zip(t[1:], t[2:], strict=False)),
            "pull_ms_per_request": 1000 * (seconds1 - seconds0) / max(1, len(samples)),
            "pulls_per_request": (pulls1 - pulls0) / max(1, len(samples))}


def child(args: argparse.Namespace, model: str, mode: str) -> dict[str, Any]:
    """One mode in its own process (a fresh Ray and Serve: no app of the other mode lingers)."""
    cmd = [sys.executable, __file__, "--child", model, mode, "--prompt-len", str(args.prompt_len),
           "--requests", str(args.requests), "--warmup", str(args.warmup), "--chunk", str(args.chunk)] + (["--pin"] if args.pin else []) + (["--payload"] if args.payload else [])
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
    if done.returncode:
        raise RuntimeError(f"{mode} run failed:\n{done.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompt-len", type=int, default=2048)
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--chunk", type=int, default=256, help="prefill.max_num_batched_tokens")
    parser.add_argument("--out", default="docs/figures")
    parser.add_argument("--pin", action="store_true", help="prefill on core 0, decode on core 1")
    parser.add_argument("--payload", action="store_true", help="kv_transfer.same_host_read: false")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)  # MODEL_DIR on|off: one mode, JSON out
    args = parser.parse_args()
    import torch

    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(1, 1000, (args.prompt_len,), generator=g).tolist()
               for _ in range(args.warmup + args.requests)]
    if args.child:
        print(json.dumps(measure(args.child[0], args.child[1] == "on", prompts, args.chunk, args.warmup, args.pin,
                                 not args.payload)))
        return 0
    with tempfile.TemporaryDirectory() as scratch:
        model = write_model(Path(scratch) / "model")
        off, on = (child(args, model, mode) for mode in ("off", "on"))
    result = {"prompt_len": args.prompt_len, "chunk_tokens": args.chunk, "model": MODEL,
              "same_host_read": not args.payload,
              "kv_bytes_per_request": args.prompt_len * MODEL["num_hidden_layers"] * 2 * MODEL["hidden_size"] * 4,
              "raw_transfer_ms_p50": off["pull_ms_per_request"], "off": off, "on": on,
              "hidden_fraction": 1 - on["exposed_ms_p50"] / off["exposed_ms_p50"]}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = f"kv_streaming_chunk{args.chunk}{'_payload' if args.payload else ''}"
    (out / f"{name}.json").write_text(json.dumps(result, indent=2))
    plot(result, out / f"{name}.png")
    print(f"raw transfer {result['raw_transfer_ms_p50']:.1f} ms/request; exposed p50 off "
          f"{off['exposed_ms_p50']:.1f} ms, on {on['exposed_ms_p50']:.1f} ms; hidden "
          f"{100 * result['hidden_fraction']:.0f}%")
    return 0


def new_axes() -> Any:
    """One small matplotlib figure (Agg backend) for these benchmarks' plots; save with save()."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(6, 3.5))[1]


def save(ax: Any, path: Path) -> None:
    import matplotlib.pyplot as plt

    ax.legend()
    ax.figure.tight_layout()
    ax.figure.savefig(path, dpi=110)
    plt.close(ax.figure)


def plot(result: dict[str, Any], path: Path) -> None:
    """Exposed transfer per request, streaming off vs on, with the raw pull time for scale."""
    off, on = result["off"]["exposed_ms"], result["on"]["exposed_ms"]
    xs = range(len(off))
    ax = new_axes()
    ax.bar([x - 0.2 for x in xs], off, width=0.4, label="streaming off")
    ax.bar([x + 0.2 for x in xs], on, width=0.4, label="streaming on")
    ax.axhline(result["raw_transfer_ms_p50"], color="grey", linestyle="--", label="raw pull (off), per request")
    ax.set(xlabel="request", ylabel="exposed transfer (ms)",
           title=f"{result['prompt_len']}-token prompts, {result['chunk_tokens']}-token chunks: "
                 f"{100 * result['hidden_fraction']:.0f}% hidden")
    save(ax, path)


if __name__ == "__main__":
    raise SystemExit(main())
