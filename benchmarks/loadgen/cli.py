"""`pdserve bench`: load-test a running router (see benchmarks/loadgen/ for the parts).

    pdserve bench --address 127.0.0.1:50051 --concurrency 1,4,16 --num-requests 64 --out out/
    pdserve bench --address ... --request-rate 1,2,4 --dataset mixed --slo-ttft-ms 500 --slo-tpot-ms 50
    pdserve bench --endpoint openai --address 127.0.0.1:8000 ...   # the same, over OpenAI HTTP (SSE)
"""

from __future__ import annotations

import argparse
import asyncio
import math
import sys
from collections.abc import Sequence
from pathlib import Path

import grpc

from benchmarks.loadgen.config import DATASETS, ENDPOINTS, SLO, BenchConfig, DatasetConfig, Load
from benchmarks.loadgen.plots import write_plots
from benchmarks.loadgen.report import format_table, write_json
from benchmarks.loadgen.runner import run_bench
from deploy.discovery import RouterAddress, resolve, unreachable

FALLBACK_VOCAB = 256
DEFAULT_ADDRESS = {"grpc": "127.0.0.1:50051", "openai": "127.0.0.1:8000"}


def _numbers(text: str, kind: type) -> list:  # type: ignore[type-arg]
    return [kind(x) for x in text.split(",") if x.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pdserve bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--endpoint", choices=ENDPOINTS, default="grpc",
                   help="grpc: Router.Generate; openai: POST /v1/completions with SSE streaming")
    p.add_argument("--address", default=None, help="router HOST:PORT (grpc default: $PDSERVE_ADDRESS, "
                   "else the running `pdserve up` on this machine, else 127.0.0.1:50051; openai default: "
                   "127.0.0.1:8000)")
    p.add_argument("--concurrency", default=None,
                   help="requests in flight (comma list = one run each); with --request-rate: a cap")
    p.add_argument("--request-rate", default=None,
                   help="Poisson arrivals in req/s (comma list = one run each; inf = all at once)")
    p.add_argument("--num-requests", type=int, default=100, help="requests per run")
    p.add_argument("--warmup", type=int, default=0, help="requests sent (and not recorded) first")
    p.add_argument("--dataset", choices=DATASETS, default="uniform")
    p.add_argument("--input-len", type=int, default=128, help="prompt tokens (mixed: the long prompts)")
    p.add_argument("--output-len", type=int, default=64, help="output tokens (mixed: the long answers)")
    p.add_argument("--short-len", type=int, default=8, help="mixed: short prompts / short answers")
    p.add_argument("--range-ratio", type=float, default=0.5, help="uniform/mixed: lengths len*(1 +- r)")
    p.add_argument("--long-fraction", type=float, default=0.5, help="mixed: share of long prompts")
    p.add_argument("--vocab", type=int, default=None,
                   help="prompt ids are drawn below this (default: from GetStatus (grpc), else 256)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--slo-ttft-ms", type=float, default=None)
    p.add_argument("--slo-tpot-ms", type=float, default=None)
    p.add_argument("--timeout", type=float, default=600.0, help="per-request deadline, seconds")
    p.add_argument("--api-key", default=None)
    p.add_argument("--root-ca", default=None, help="PEM CA file: use TLS")
    p.add_argument("--out", default=None, help="directory for result.json and the PNG plots")
    p.add_argument("--no-progress", action="store_true")
    return p


def _loads(args: argparse.Namespace) -> tuple[Load, ...]:
    rates = _numbers(args.request_rate, float) if args.request_rate else []
    caps = _numbers(args.concurrency, int) if args.concurrency else []
    if rates:
        if len(caps) > 1:
            raise ValueError("--concurrency takes one value (a cap) when --request-rate is set")
        return tuple(Load(rate, caps[0] if caps else None) for rate in rates)
    return tuple(Load(math.inf, c) for c in caps or [1])


def _vocab(address: str, given: int | None, api_key: str | None, endpoint: str = "grpc") -> int:
    """--vocab, else StatusResponse.vocab_size when the router reports one, else FALLBACK_VOCAB."""
    if given is not None:
        return given
    if endpoint != "grpc":
        return FALLBACK_VOCAB
    from router.client import Endpoint, get_status

    status = get_status(Endpoint(address, api_key))
    vocab = int(getattr(status, "vocab_size", 0) or 0)
    if vocab <= 0:
        print(f"[bench] the router does not report its vocabulary: prompt ids < {FALLBACK_VOCAB} "
              "(set --vocab)", file=sys.stderr)
        return FALLBACK_VOCAB
    return vocab


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    address = args.address or DEFAULT_ADDRESS[args.endpoint]
    dataset = DatasetConfig(
        kind=args.dataset, input_len=args.input_len, output_len=args.output_len,
        short_len=args.short_len, range_ratio=args.range_ratio, long_fraction=args.long_fraction,
        vocab_size=_vocab(address, args.vocab, args.api_key, args.endpoint), seed=args.seed,
    )
    return BenchConfig(
        address=address, endpoint=args.endpoint, loads=_loads(args), dataset=dataset, num_requests=args.num_requests,
        warmup=args.warmup, slo=SLO(args.slo_ttft_ms, args.slo_tpot_ms), timeout_s=args.timeout,
        api_key=args.api_key, root_ca=args.root_ca, seed=args.seed, progress=not args.no_progress,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """`pdserve bench ARGS` -> main(ARGS). A leading "--" is dropped (`pdserve bench -- --address ...`)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv[1:] if argv[:1] == ["--"] else argv)
    router = resolve(args.address) if args.endpoint == "grpc" else RouterAddress(
        args.address or DEFAULT_ADDRESS["openai"], "--address" if args.address else "the HTTP default")
    args.address = router.address
    try:
        cfg = config_from_args(args)
        results = asyncio.run(run_bench(cfg))
    except (grpc.RpcError, TimeoutError) as exc:
        if isinstance(exc, grpc.Call) and exc.code() != grpc.StatusCode.UNAVAILABLE:
            raise
        print(unreachable(router), file=sys.stderr)
        return 1
    print(format_table(results))
    if args.out:
        out = Path(args.out)
        written = [write_json(out / "result.json", cfg, results), *write_plots(results, out)]
        print("wrote " + ", ".join(str(p) for p in written))
    return 0 if all(r.stats.failed == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
