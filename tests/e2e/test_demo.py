"""`pdserve demo` as a user runs it: its own Ray, the default model, real output, a clean exit."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

from deploy.demo import DEMO_PROMPTS


def test_pdserve_demo_streams_language_and_exits_cleanly(tmp_path: Path) -> None:
    exe = Path(sys.executable).with_name("pdserve")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    start = time.monotonic()
    run = subprocess.run([str(exe), "demo", "--max-tokens", "24"], capture_output=True, text=True,
                         timeout=240, env=env, cwd=tmp_path)
    took = time.monotonic() - start
    assert run.returncode == 0, run.stderr[-3000:]
    out = run.stdout
    assert "router SERVING on" in out
    for i, prompt in enumerate(DEMO_PROMPTS, 1):
        assert f"[{i}] {prompt}" in out
        row = re.search(rf"^\[{i}\]\s+(\d+)\s+([\d.]+)\s+([\d.]+)$", out, re.M)
        assert row is not None and int(row.group(1)) >= 1 and float(row.group(2)) > 0
    words = re.findall(r"[A-Za-z]{3,}", out.split("router SERVING")[1])
    assert {"statement", "the"} & {w.lower() for w in words}  # the trained model writes about Python
    assert took < 180
