"""The CLI as a user meets it when something is wrong: one line naming the problem, no traceback.

Every case runs the real `pdserve` executable in a subprocess, with a private PDSERVE_STATE_DIR.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from deploy import discovery

EXE = str(Path(sys.executable).with_name("pdserve"))


def _dead_address() -> str:
    with socket.socket() as s:  # bound, then closed: nothing listens there
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


def _pdserve(*args: str, state: Path, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if k not in ("PDSERVE_ADDRESS", "RAY_ADDRESS")}
    environ.update(PDSERVE_STATE_DIR=str(state), **env)
    return subprocess.run([EXE, *args], env=environ, capture_output=True, text=True, timeout=120)


def _one_line(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode != 0
    assert "Traceback" not in done.stderr, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    return lines[0]


@pytest.mark.parametrize("command", [["generate", "Hello"], ["status"], ["bench", "--num-requests", "2"]])
def test_an_unreachable_router_is_one_line_naming_the_address(command: list[str], tmp_path: Path) -> None:
    address = _dead_address()
    line = _one_line(_pdserve(*command, "--address", address, state=tmp_path))
    assert address in line and "--address" in line and "PDSERVE_ADDRESS" in line


def test_precedence_flag_then_env_then_recorded_then_default(tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    recorded, env, flag = _dead_address(), _dead_address(), _dead_address()
    with monkeypatch.context() as m:
        m.setenv(discovery.ENV_STATE_DIR, str(tmp_path))
        record = discovery.record(recorded, "c.yaml")  # as a live `pdserve up` (this process) would
    assert f"{recorded} (recorded by `pdserve up`" in _one_line(_pdserve("status", state=tmp_path))
    line = _one_line(_pdserve("status", state=tmp_path, PDSERVE_ADDRESS=env))
    assert f"{env} (PDSERVE_ADDRESS)" in line
    line = _one_line(_pdserve("status", "--address", flag, state=tmp_path, PDSERVE_ADDRESS=env))
    assert f"{flag} (--address)" in line
    discovery.forget(record)
    monkeypatch.setenv(discovery.ENV_STATE_DIR, str(tmp_path))
    monkeypatch.delenv(discovery.ENV_ADDRESS, raising=False)
    assert discovery.resolve(None).address == discovery.DEFAULT_ADDRESS  # (a router may run there)


def test_a_record_left_by_a_killed_pdserve_up_is_ignored(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    stale = tmp_path / f"up-{gone.stdout.strip()}.json"
    stale.write_text(f'{{"address": "{_dead_address()}", "pid": {gone.stdout.strip()}, "started": 1}}')
    monkeypatch.setenv(discovery.ENV_STATE_DIR, str(tmp_path))
    monkeypatch.delenv(discovery.ENV_ADDRESS, raising=False)
    assert discovery.resolve(None).address == discovery.DEFAULT_ADDRESS
    assert not stale.exists()


def test_model_path_pointing_nowhere_names_the_key(tmp_path: Path) -> None:
    line = _one_line(_pdserve("up", "--set", "model.path=/x/nowhere", state=tmp_path))
    assert line == "pdserve: error: defaults: model.path: /x/nowhere does not exist"
    config = tmp_path / "c.yaml"
    config.write_text("model:\n  path: empty\n")
    (tmp_path / "empty").mkdir()
    line = _one_line(_pdserve("up", str(config), state=tmp_path))
    assert line.startswith(f"pdserve: error: {config}: model.path: {tmp_path / 'empty'} has no config.json")
