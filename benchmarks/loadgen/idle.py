"""CPU a served cluster costs: `pdserve up` in a child process, some requests, then the CPU time of
every process of the cluster over a window, pdserve's own processes apart from Ray's.

The cluster's processes are the `pdserve up` process and its descendants (Ray's daemons are its
children, Ray's workers the raylet's). A process is pdserve's when it is the `pdserve up` process
(the router runs there) or a Ray worker hosting a pdserve actor (Serve replicas of the pdserve
applications, TP ranks); everything else (GCS, raylet, dashboard, Serve's controller and proxy,
idle workers, agents) is Ray's.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass

TICKS = os.sysconf("SC_CLK_TCK")
RAY_ACTORS = ("ray::ServeController", "ray::ProxyActor", "ray::DashboardAgent", "ray::RuntimeEnvAgent",
              "ray::IDLE", "ray::_StatusActor")
LISTENING = re.compile(r"listening on (\S+)")


@dataclass(frozen=True, slots=True)
class ThreadCPU:
    name: str  # the kernel's thread name; "main" for the process's first thread
    cores: float


@dataclass(frozen=True, slots=True)
class ProcessCPU:
    pid: int
    name: str
    pdserve: bool  # pdserve's own process (else Ray's)
    cores: float  # CPU seconds per second over the window
    threads: tuple[ThreadCPU, ...] = ()  # the threads that used any, most first


@dataclass(frozen=True, slots=True)
class IdleReport:
    window_s: float
    processes: tuple[ProcessCPU, ...]

    @property
    def pdserve_cores(self) -> float:
        return sum(p.cores for p in self.processes if p.pdserve)

    @property
    def ray_cores(self) -> float:
        return sum(p.cores for p in self.processes if not p.pdserve)


def descendants(root: int) -> list[int]:
    """root and every process below it."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            stat = _stat(int(entry))
            if stat is not None:
                children.setdefault(int(stat[1]), []).append(int(entry))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, ()))
    return out


def _read_stat(path: str) -> tuple[str, list[str]] | None:
    """(command name, fields after it: state, ppid, ...) of a /proc stat file, None if gone."""
    try:
        with open(path) as f:
            raw = f.read()
    except OSError:
        return None
    head, rest = raw.rsplit(")", 1)
    return head[head.index("(") + 1 :], rest.split()


def _stat(pid: int) -> list[str] | None:
    """Fields of /proc/pid/stat after the command name (state, ppid, ...), None if gone."""
    stat = _read_stat(f"/proc/{pid}/stat")
    return None if stat is None else stat[1]


def _ticks(fields: list[str]) -> int:
    return int(fields[11]) + int(fields[12])  # utime + stime


def cpu_ticks(pid: int) -> int:
    stat = _stat(pid)
    return 0 if stat is None else _ticks(stat)


def thread_ticks(pid: int) -> dict[int, tuple[str, int]]:
    """tid -> (thread name, utime + stime) for each thread of pid (empty if gone). Python threads
    carry the process's name at the time they started (Ray's workers: "ray::IDLE")."""
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return {}
    out: dict[int, tuple[str, int]] = {}
    for tid in tids:
        stat = _read_stat(f"/proc/{pid}/task/{tid}/stat")
        if stat is not None:
            out[int(tid)] = ("main" if int(tid) == pid else stat[0], _ticks(stat[1]))
    return out


def command(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def is_pdserve(pid: int, root: int, cmd: str) -> bool:
    if pid == root:
        return True
    return cmd.startswith("ray::") and not cmd.startswith(RAY_ACTORS)


def measure(root: int, window_s: float) -> IdleReport:
    """CPU of root's process tree over window_s seconds (processes alive at the start)."""
    pids = descendants(root)
    before = {pid: cpu_ticks(pid) for pid in pids}
    threads_before = {pid: thread_ticks(pid) for pid in pids}
    time.sleep(window_s)
    rows = []
    for pid in pids:
        cmd = command(pid)
        used = max(0, cpu_ticks(pid) - before[pid]) / TICKS / window_s
        threads = [ThreadCPU(name, (ticks - threads_before[pid].get(tid, (name, 0))[1]) / TICKS / window_s)
                   for tid, (name, ticks) in thread_ticks(pid).items()]
        busy = tuple(sorted((t for t in threads if t.cores > 0), key=lambda t: -t.cores))
        rows.append(ProcessCPU(pid, cmd[:80], is_pdserve(pid, root, cmd), used, busy))
    return IdleReport(window_s, tuple(sorted(rows, key=lambda r: -r.cores)))


def pdserve_up(args: Sequence[str], timeout: float = 180.0) -> AbstractContextManager[tuple[subprocess.Popen[str], str]]:
    """`pdserve up ARGS` in a child process (see `serving`)."""
    return serving([os.path.join(os.path.dirname(sys.executable), "pdserve"), "up", *args], timeout)


@contextmanager
def serving(cmd: Sequence[str], timeout: float = 180.0) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """cmd in a child process: yields it and the address it printed ("listening on ADDRESS") once
    it serves; stops it with Ctrl-C (SIGINT) afterwards. A thread keeps reading its output (a full
    pipe would block it) into `proc.lines`."""
    proc = subprocess.Popen(list(cmd), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    lines: list[str] = []
    address: list[str] = []
    serving = threading.Event()
    threading.Thread(target=_read, args=(proc, lines, address, serving), daemon=True).start()
    proc.lines = lines  # type: ignore[attr-defined]
    try:
        if not serving.wait(timeout) or not address:
            raise RuntimeError(f"{cmd[0]} did not start serving:\n" + "".join(lines[-30:]))
        yield proc, address[0]
    finally:
        stop(proc)


def _read(proc: subprocess.Popen[str], lines: list[str], address: list[str], serving: threading.Event) -> None:
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line)
        found = LISTENING.search(line)
        if found and not address:
            address.append(found.group(1))
            serving.set()
    serving.set()  # it exited


def stop(proc: subprocess.Popen[str], timeout: float = 60.0) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def send_requests(address: str, count: int, max_tokens: int = 16) -> int:
    """count requests one after another; returns the tokens generated."""
    from router.client import generate

    tokens = 0
    for i in range(count):
        done = generate(address, f"Request {i}: the for statement", timeout=60, max_tokens=max_tokens)
        tokens += len(done.token_ids)
    return tokens


def format_report(title: str, report: IdleReport, top: int = 8) -> str:
    lines = [f"{title}: pdserve {report.pdserve_cores:.4f} cores, Ray {report.ray_cores:.4f} cores "
             f"(over {report.window_s:.0f} s)"]
    for row in report.processes[:top]:
        if row.cores > 0:
            lines.append(f"  {row.cores:7.4f}  {'pdserve' if row.pdserve else 'ray    '}  {row.name}")
            if row.pdserve:  # where a pdserve process spends it, by thread
                lines.append("           " + ", ".join(f"{t.name} {t.cores:.4f}" for t in row.threads[:6]))
    return "\n".join(lines)
