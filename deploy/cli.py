"""`pdserve` command line: up, generate, status, demo, apply, bench, make-model."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

if TYPE_CHECKING:
    from deploy.discovery import RouterAddress

ADDRESS_HELP = ("router HOST:PORT (default: $PDSERVE_ADDRESS, else the running `pdserve up` on this "
                "machine, else 127.0.0.1:50051)")


def _cmd_up(args: argparse.Namespace) -> int:
    from deploy import discovery
    from deploy.cluster import Cluster
    from deploy.config import load_config

    _quiet_serve()
    cfg = load_config(args.config, args.set or ())

    async def run() -> None:
        cluster = Cluster(cfg, args.config or "defaults")
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        record: Path | None = None
        try:
            address = await cluster.start()
            record = discovery.record(address, args.config)
            http = cluster.router.http_address
            door = f", OpenAI HTTP on http{'s' if cfg.router.tls.cert else ''}://{http}/v1" if http else ""
            print(f"pdserve router listening on {address} (gRPC){door} (Ctrl-C to stop)", flush=True)
            await stop.wait()
        finally:
            if record is not None:
                discovery.forget(record)
            print("shutting down...", flush=True)
            await cluster.stop()

    asyncio.run(run())
    _exit_now(0)


def _exit_now(code: int) -> NoReturn:
    """Leave without the interpreter's teardown once everything is stopped: collecting the ~300k
    objects torch, Ray and gRPC leave took 2-10 s of a Ctrl-C'd `pdserve up` on a busy 2-core box."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _cmd_generate(args: argparse.Namespace) -> int:
    from router.client import generate_stream

    usage = None
    for chunk in generate_stream(
        args.router.address, args.prompt, timeout=args.timeout, max_tokens=args.max_tokens,
        temperature=args.temperature, seed=args.seed,
    ):
        sys.stdout.write(chunk.text)
        sys.stdout.flush()
        usage = chunk.usage or usage
    print()
    if usage is not None:
        print(f"[prompt {usage[0]} tokens, completion {usage[1]} tokens]", file=sys.stderr)
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    from router.client import format_status, get_status, status_json

    status = get_status(args.router.address)
    print(json.dumps(status_json(status), indent=2) if args.json else format_status(status))
    return 0


def _cmd_make_model(args: argparse.Namespace) -> int:
    from engine.make_model import make_model

    path = make_model(args.dir, arch=args.arch, size=args.size, seed=args.seed)
    print(f"wrote a random {args.arch}/{args.size} checkpoint to {path}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from deploy.demo import run_demo

    _quiet_serve()
    _exit_now(run_demo(args.config, args.max_tokens))


def _cmd_apply(args: argparse.Namespace) -> int:
    from deploy.apply import apply

    return apply(args.config)


def _cmd_bench(args: argparse.Namespace) -> int:
    from benchmarks.loadgen.cli import main as bench_main

    return bench_main(args.rest)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pdserve", description="disaggregated prefill/decode LLM serving")
    sub = p.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="start Ray, both pools and the router from a YAML file")
    up.add_argument("config", nargs="?", help="YAML file (default: the embedded local CPU config)")
    up.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a YAML key")
    up.set_defaults(fn=_cmd_up)
    gen = sub.add_parser("generate", help="stream a completion from a running router")
    gen.add_argument("prompt")
    gen.add_argument("--address", default=None, help=ADDRESS_HELP)
    gen.add_argument("--max-tokens", type=int, default=None)
    gen.add_argument("--temperature", type=float, default=None)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--timeout", type=float, default=120.0)
    gen.set_defaults(fn=_cmd_generate)
    st = sub.add_parser("status", help="pools, replicas, KV use")
    st.add_argument("--address", default=None, help=ADDRESS_HELP)
    st.add_argument("--json", action="store_true")
    st.set_defaults(fn=_cmd_status)
    demo = sub.add_parser("demo", help="start the default cluster, stream a few prompts, shut down")
    demo.add_argument("--config", default=None)
    demo.add_argument("--max-tokens", type=int, default=48)
    demo.set_defaults(fn=_cmd_demo)
    ap = sub.add_parser("apply", help="change a running deployment")
    ap.add_argument("config")
    ap.set_defaults(fn=_cmd_apply)
    bench = sub.add_parser("bench", help="load generator (see `pdserve bench --help`)", add_help=False)
    bench.add_argument("rest", nargs=argparse.REMAINDER)
    bench.set_defaults(fn=_cmd_bench)
    mm = sub.add_parser("make-model", help="write a random-weight HF checkpoint")
    mm.add_argument("dir")
    mm.add_argument("--arch", choices=("llama", "qwen2", "mistral"), default="llama")
    mm.add_argument("--size", choices=("tiny", "small"), default="tiny")
    mm.add_argument("--seed", type=int, default=0)
    mm.set_defaults(fn=_cmd_make_model)
    return p


def _quiet_logs() -> None:
    """Keep the terminal for pdserve's own output: Ray, Serve and gRPC's C core log at WARNING+."""
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for name in ("ray", "ray.serve", "ray.data"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _quiet_serve() -> None:
    """Serve's client notes (started, app ready, deleting app) at INFO: pdserve prints its own. Its
    logger is configured when ray.serve is imported, so this runs after that import."""
    logging.getLogger("ray.serve").setLevel(logging.WARNING)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:  # the load generator parses its own options (many start with --)
        _quiet_logs()
        from benchmarks.loadgen.cli import main as bench_main

        return bench_main(argv[1:])
    args = build_parser().parse_args(argv)
    _quiet_logs()
    if "address" in args:
        from deploy.discovery import resolve

        args.router = resolve(args.address)
    try:
        return int(args.fn(args))
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # noqa: BLE001 - the CLI's last line of defence: one clear line
        return _one_line(exc, getattr(args, "router", None))


def _one_line(exc: Exception, router: RouterAddress | None) -> int:
    """Expected failures as one line on stderr (exit status 1 or 2); anything else re-raised."""
    import grpc

    from deploy.config import ConfigError
    from deploy.discovery import unreachable

    if isinstance(exc, grpc.RpcError) and router is not None:
        code = exc.code() if isinstance(exc, grpc.Call) else None
        if code == grpc.StatusCode.UNAVAILABLE:
            print(unreachable(router), file=sys.stderr)
        else:
            details = exc.details() if isinstance(exc, grpc.Call) else str(exc)
            print(f"pdserve: the router at {router.address} answered "
                  f"{code.name if code else 'an error'}: {details}", file=sys.stderr)
        return 1
    if isinstance(exc, ConfigError | FileNotFoundError | ValueError):
        print(f"pdserve: error: {exc}", file=sys.stderr)
        return 2
    raise exc
