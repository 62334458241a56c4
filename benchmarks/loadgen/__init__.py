"""`pdserve bench`: a load generator for the Router API, like `vllm bench serve`.

    dataset.py   seeded prompt / output length distributions -> RequestSpec
    arrivals.py  Poisson arrival offsets (or none: fixed concurrency)
    runner.py    the grpc.aio client: sends, times every streamed message, measures its own overhead
    stats.py     percentiles, TTFT / TPOT / ITL, throughput, goodput under an SLO
    report.py    result.json and the text summary
    plots.py     latency CDFs and goodput vs load (matplotlib, Agg)
    null_cluster.py  a real router with model-free prefill/decode workers (benchmarks, tests)
    cli.py       the command line (`pdserve bench`, `python -m benchmarks.loadgen.cli`)
"""
