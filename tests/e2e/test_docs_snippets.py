"""Every block of README.md and docs/*.md marked runnable runs as written, as a new user runs it.

Marking (the convention, also in docs/structures.md): the line directly above a block's opening
fence is `<!-- runnable -->` (or `<!-- runnable: cluster -->`: the same) for a block that talks to a
running cluster, `<!-- runnable: offline -->` for one that needs none. bash blocks run through
`bash -e` and python blocks as a script file with the venv's python, from the repository root with
the venv's bin first on PATH (tests/snippets.py). Any language or marker without a runner fails the
collection, so a new kind of block (an OpenAI SDK client, say) needs only its marker.

Cluster blocks run against ONE cluster for this module, started as the README says, `pdserve up
deploy/examples/local-cpu.yaml` in its own process group, with two differences that keep it off
other clusters on the machine: `--set router.port=<a free port>` and a private PDSERVE_STATE_DIR. So
shell blocks find the router the way a user's commands do, through the address `pdserve up`
records; python blocks get it as PDSERVE_ADDRESS (the README's client reads that variable). The last
test stops that cluster the way a user does, Ctrl-C (SIGINT to the process group), and checks the
shutdown is quick and quiet.

Blocks meant to be run but not marked, and why:
- `make demo`, `make test` (README top): `make test` is the whole suite (about 14 minutes on a busy
  2-core box); `make demo` is `pdserve demo`, run by tests/e2e/test_demo.py.
- the `pdserve up` line itself: it is what the fixture below runs (it blocks until Ctrl-C).
- docs/benchmarks.md commands: minutes each, they produce the figures, not checks.
- docs/deploy.md `ray up`, `kubectl`, `pdserve apply my.yaml`: need a cloud account, a Kubernetes
  cluster or the user's own file (apply is tested by tests/e2e/test_apply.py).
The rest are not meant to be run: YAML fragments, sample output, interface listings.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.snippets import PYTHONS, REPO, Snippet, all_snippets, run, user_env

SNIPPETS = all_snippets()
START_TIMEOUT_S = 300.0
SNIPPET_TIMEOUT_S = 180.0
SHUTDOWN_LIMIT_S = 10.0


@dataclass(slots=True)
class UpProcess:
    proc: subprocess.Popen[bytes]
    log: Path
    address: str
    state_dir: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_listening(up: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while "pdserve router listening on" not in log.read_text(errors="replace"):
        if up.poll() is not None:
            pytest.fail(f"`pdserve up` exited with {up.returncode}:\n{log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"`pdserve up` not SERVING after {START_TIMEOUT_S:.0f} s")
        time.sleep(0.5)


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(30)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[UpProcess]:
    scratch = tmp_path_factory.mktemp("up")
    port, log = _free_port(), scratch / "up.log"
    env = user_env(PDSERVE_STATE_DIR=str(scratch / "state"))
    cmd = ["pdserve", "up", "deploy/examples/local-cpu.yaml", "--set", f"router.port={port}"]
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)  # its own group, as a terminal's job
    try:
        _wait_listening(proc, log)
        yield UpProcess(proc, log, f"127.0.0.1:{port}", scratch / "state")
    finally:
        if proc.poll() is None:
            _kill_group(proc)


def _by_kind(kind: str) -> list[Snippet]:
    return [s for s in SNIPPETS if s.kind == kind]


def test_the_docs_have_runnable_blocks_of_each_kind() -> None:
    names = {s.name for s in SNIPPETS}
    assert {s.kind for s in SNIPPETS} == {"cluster", "offline"}, names
    assert any(n.startswith("README.md") for n in names) and any(n.startswith("docs/") for n in names)


@pytest.mark.parametrize("snippet", _by_kind("offline"), ids=lambda s: s.name)
def test_offline_snippet(snippet: Snippet, tmp_path: Path) -> None:
    done = run(snippet, user_env(), tmp_path, SNIPPET_TIMEOUT_S)
    assert done.returncode == 0, f"{snippet.name} failed as written:\n{done.stdout}\n{done.stderr}"
    assert "Traceback" not in done.stderr and "[c10d]" not in done.stderr, done.stderr


@pytest.mark.parametrize("snippet", _by_kind("cluster"), ids=lambda s: s.name)
def test_cluster_snippet(snippet: Snippet, cluster: UpProcess, tmp_path: Path) -> None:
    env = user_env(PDSERVE_STATE_DIR=str(cluster.state_dir))
    if snippet.lang in PYTHONS:  # (shells find the router as a user's do: the recorded address)
        env["PDSERVE_ADDRESS"] = cluster.address
    done = run(snippet, env, tmp_path, SNIPPET_TIMEOUT_S)
    assert done.returncode == 0, f"{snippet.name} failed as written:\n{done.stdout}\n{done.stderr}"
    assert "Traceback" not in done.stderr, done.stderr
    if "FinishReason.Name" in snippet.code:  # the README's client names the finish reason
        assert re.search(r"^(STOP|LENGTH) prompt_tokens", done.stdout, re.M), done.stdout


def test_status_finds_the_running_cluster_without_flags(cluster: UpProcess) -> None:
    env = user_env(PDSERVE_STATE_DIR=str(cluster.state_dir))
    done = subprocess.run(["pdserve", "status", "--json"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["serving"] is True
    records = list(cluster.state_dir.glob("up-*.json"))
    assert [json.loads(r.read_text())["address"] for r in records] == [cluster.address]


def test_ctrl_c_stops_the_cluster_quickly_and_quietly(cluster: UpProcess) -> None:
    """Ctrl-C in a terminal sends SIGINT to the whole foreground process group."""
    os.killpg(cluster.proc.pid, signal.SIGINT)
    start = time.monotonic()
    try:
        cluster.proc.wait(60)
    except subprocess.TimeoutExpired:
        pytest.fail(f"`pdserve up` still running 60 s after Ctrl-C:\n{cluster.output()[-3000:]}")
    took = time.monotonic() - start
    out = cluster.output()
    print(f"pdserve up stopped {took:.1f} s after Ctrl-C; its output:\n{out}", file=sys.stderr)
    alarming = [line for line in out.splitlines() if "failed" in line.lower() or "Traceback" in line]
    assert alarming == [], out
    assert cluster.proc.returncode == 0, out
    assert took < SHUTDOWN_LIMIT_S, f"shutdown took {took:.1f} s"
    assert not list(cluster.state_dir.glob("up-*.json")), "the recorded address outlived pdserve up"
