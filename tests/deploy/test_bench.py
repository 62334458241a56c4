"""`pdserve bench` parts: stats math, the seeded arrival process and datasets, and a whole run
(CLI -> grpc.aio client -> real router -> model-free workers) checked through its JSON and PNGs."""

from __future__ import annotations

import asyncio
import json
import math
import statistics
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from pdserve.v1 import router_pb2_grpc

from benchmarks.loadgen.arrivals import arrival_offsets
from benchmarks.loadgen.cli import _loads, build_parser
from benchmarks.loadgen.config import SLO, DatasetConfig, Load
from benchmarks.loadgen.dataset import make_requests
from benchmarks.loadgen.null_cluster import NullCluster, start_null_cluster
from benchmarks.loadgen.stats import RequestRecord, meets_slo, percentile, summarize
from deploy import cli
from router.client import build_request


def test_percentile_matches_numpy_linear() -> None:
    rng = np.random.default_rng(3)
    for n in (1, 2, 7, 100):
        xs = rng.exponential(size=n).tolist()
        for q in (0, 50, 90, 99, 100):
            assert percentile(xs, q) == pytest.approx(float(np.percentile(xs, q)))
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert math.isnan(percentile([], 50))


def _record(sent: float, times: list[float], tokens: int, error: str = "") -> RequestRecord:
    return RequestRecord(prompt_tokens=10, max_tokens=tokens, sent=sent, message_times=times,
                         output_tokens=tokens, done=times[-1] if times else sent, error=error)


def test_ttft_tpot_itl_of_one_request() -> None:
    r = _record(1.0, [1.2, 1.3, 1.6], tokens=4)  # first message 1 token, the rest 3 in 2 messages
    assert r.ttft == pytest.approx(0.2)
    assert r.e2el == pytest.approx(0.6)
    assert r.tpot == pytest.approx(0.4 / 3)
    assert r.itls() == pytest.approx([0.1, 0.3])
    assert _record(0.0, [0.5], tokens=1).tpot is None


def test_goodput_counts_requests_within_every_slo_bound() -> None:
    fast = _record(0.0, [0.05, 0.06, 0.07], tokens=3)       # TTFT 50 ms, TPOT 10 ms
    slow_first = _record(0.0, [0.5, 0.51, 0.52], tokens=3)  # TTFT 500 ms
    slow_decode = _record(0.0, [0.05, 0.25, 0.45], tokens=3)  # TPOT 200 ms
    failed = _record(0.0, [0.01], tokens=1, error="UNAVAILABLE")
    slo = SLO(ttft_ms=100, tpot_ms=50)
    assert [meets_slo(r, slo) for r in (fast, slow_first, slow_decode, failed)] == [True, False, False, False]
    stats = summarize([fast, slow_first, slow_decode, failed], duration_s=2.0, slo=slo)
    assert stats.completed == 3 and stats.failed == 1 and stats.errors == {"UNAVAILABLE": 1}
    assert stats.goodput == pytest.approx(0.5)            # 1 good request in 2 s
    assert stats.good_fraction == pytest.approx(0.25)
    assert stats.request_throughput == pytest.approx(1.5)
    assert stats.output_token_throughput == pytest.approx(4.5)
    assert stats.total_token_throughput == pytest.approx(19.5)
    assert summarize([fast, slow_first], 1.0, SLO()).goodput == 2.0  # no bounds: every success


def test_poisson_arrivals_are_seeded_with_the_right_mean_gap() -> None:
    a, b = arrival_offsets(4000, rate=20.0, seed=1), arrival_offsets(4000, rate=20.0, seed=1)
    assert a == b and a != arrival_offsets(4000, rate=20.0, seed=2)
    gaps = [y - x for x, y in zip(a, a[1:], strict=False)]
    assert a[0] == 0.0 and all(g >= 0 for g in gaps)
    assert statistics.mean(gaps) == pytest.approx(1 / 20.0, rel=0.05)
    assert statistics.stdev(gaps) == pytest.approx(1 / 20.0, rel=0.1)  # exponential: sd = mean
    assert arrival_offsets(5, math.inf) == [0.0] * 5


def test_datasets_are_seeded_within_vocab_and_lengths() -> None:
    fixed = make_requests(DatasetConfig("fixed", input_len=12, output_len=5, vocab_size=50), 20)
    assert all(len(s.prompt_ids) == 12 and s.max_tokens == 5 for s in fixed)
    cfg = DatasetConfig("uniform", input_len=100, output_len=40, range_ratio=0.5, vocab_size=50, seed=3)
    specs = make_requests(cfg, 200)
    assert specs == make_requests(cfg, 200)
    assert all(1 <= t < 50 for s in specs for t in s.prompt_ids)
    assert {len(s.prompt_ids) for s in specs} <= set(range(50, 151)) and len({len(s.prompt_ids) for s in specs}) > 20
    again = make_requests(cfg, 200, seed_offset=5)  # another run: same lengths, fresh prompts
    assert [len(s.prompt_ids) for s in again] == [len(s.prompt_ids) for s in specs]
    assert again != specs


def test_mixed_dataset_has_both_shapes() -> None:
    cfg = DatasetConfig("mixed", input_len=200, output_len=100, short_len=10, range_ratio=0.1,
                        long_fraction=0.3, vocab_size=1000)
    specs = make_requests(cfg, 400)
    longs = [s for s in specs if s.kind == "long_prompt"]
    answers = [s for s in specs if s.kind == "long_answer"]
    assert len(longs) + len(answers) == 400 and 0.2 < len(longs) / 400 < 0.4
    assert all(len(s.prompt_ids) >= 180 and s.max_tokens <= 11 for s in longs)
    assert all(len(s.prompt_ids) <= 11 and s.max_tokens >= 90 for s in answers)


def test_loads_from_the_command_line() -> None:
    def loads(*argv: str) -> tuple[Load, ...]:
        return _loads(build_parser().parse_args(list(argv)))

    assert loads() == (Load(math.inf, 1),)
    assert loads("--concurrency", "1,4,16") == tuple(Load(math.inf, c) for c in (1, 4, 16))
    assert loads("--request-rate", "2,inf", "--concurrency", "8") == (Load(2.0, 8), Load(math.inf, 8))
    with pytest.raises(ValueError, match="--request-rate"):
        loads("--request-rate", "0")


@pytest.fixture(scope="module")
def null_cluster() -> Iterator[NullCluster]:
    """A real router with model-free workers, on its own event-loop thread."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    cluster = asyncio.run_coroutine_threadsafe(start_null_cluster(decode=3), loop).result(30)
    try:
        yield cluster
    finally:
        asyncio.run_coroutine_threadsafe(cluster.stop(), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)


def check_png(path: Path) -> None:
    """A real PNG with drawn content (not one flat colour)."""
    import matplotlib.image as mpimg

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pixels = mpimg.imread(path)
    assert pixels.ndim == 3 and pixels.shape[0] > 100 and pixels.shape[1] > 100
    non_white = (pixels[..., :3] < 0.9).any(axis=-1).mean()
    assert 0.01 < non_white < 0.9, non_white
    assert len(np.unique(pixels.reshape(-1, pixels.shape[-1]), axis=0)) > 10


def check_run(run: dict, num_requests: int) -> None:
    assert run["num_requests"] == num_requests and run["completed"] == num_requests
    assert run["failed"] == 0 and run["errors"] == {}
    assert run["request_throughput"] > 0 and run["output_token_throughput"] > 0
    assert run["total_token_throughput"] > run["output_token_throughput"]
    for name in ("ttft_ms", "tpot_ms", "itl_ms", "e2el_ms"):
        d = run[name]
        assert d["count"] > 0 and 0 <= d["min"] <= d["p50"] <= d["p90"] <= d["p99"] <= d["max"], (name, d)
    assert run["e2el_ms"]["p50"] >= run["ttft_ms"]["p50"]
    reqs = run["requests"]
    assert len(reqs) == num_requests and all(r["ok"] and r["error"] == "" for r in reqs)
    assert all(r["output_tokens"] == r["max_tokens"] for r in reqs)  # ignore_eos: exact lengths
    assert run["client"]["cpu_s"] > 0 and run["client"]["loop_lag_ms"]["count"] > 0


def test_bench_cli_against_a_router_with_null_workers(null_cluster: NullCluster, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    rc = cli.main(["bench", "--address", null_cluster.address, "--request-rate", "50,200",
                   "--num-requests", "24", "--warmup", "4", "--dataset", "mixed", "--input-len", "40",
                   "--output-len", "30", "--short-len", "4", "--vocab", "1000", "--slo-ttft-ms", "10000",
                   "--slo-tpot-ms", "10000", "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr()
    assert "TTFT" in printed.out and "goodput" in printed.out and "24/24" in printed.err
    result = json.loads((out / "result.json").read_text())
    assert result["config"]["dataset"]["kind"] == "mixed"
    assert [r["request_rate"] for r in result["runs"]] == [50.0, 200.0]
    for run in result["runs"]:
        check_run(run, 24)
        assert run["goodput"] == pytest.approx(run["request_throughput"])  # loose SLO: all good
        assert {r["kind"] for r in run["requests"]} == {"long_prompt", "long_answer"}
    check_png(out / "latency_cdf.png")
    check_png(out / "goodput_vs_rate.png")


def test_null_engine_streams_through_the_real_decode_service() -> None:
    """The "engine" null decode (data-plane benchmark): exact token counts through the real router,
    tokens merged into fewer messages than tokens when they pile up."""
    async def go() -> list[list[int]]:
        cluster = await start_null_cluster(decode="engine")
        try:
            async with grpc.aio.insecure_channel(cluster.address) as channel:
                stub = router_pb2_grpc.RouterStub(channel)

                async def one(n: int) -> list[int]:
                    request = build_request([5, 6], max_tokens=n, ignore_eos=True)
                    return [len(m.token_ids) async for m in stub.Generate(request, timeout=30)]

                return await asyncio.gather(*(one(n) for n in (1, 2, 500, 500)))
        finally:
            await cluster.stop()

    sizes = asyncio.run(go())
    assert [sum(s) for s in sizes] == [1, 2, 500, 500]
    assert sizes[0] == [1] and sizes[1] == [1, 1]
    assert len(sizes[2]) < 500  # merged per step batches
