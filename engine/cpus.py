"""Pinning a worker process to CPU cores (per-pool `cpu_affinity` in the deploy YAML)."""

from __future__ import annotations

import os
from collections.abc import Sequence


def pin_process(cores: Sequence[int]) -> None:
    """Pins every thread of this process, and the threads it starts later, to `cores`.

    Empty `cores` leaves the affinity as it is. Raises ValueError naming the cores when none of them
    is usable here (e.g. core 7 on a 2-core machine).
    """
    if not cores:
        return
    wanted = set(cores)
    try:
        os.sched_setaffinity(0, wanted)
    except OSError as exc:
        raise ValueError(f"cpu_affinity {sorted(wanted)}: cannot pin this process ({exc})") from exc
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(tid), wanted)
        except OSError:  # the thread ended meanwhile
            pass


def thread_cores() -> list[list[int]]:
    """The distinct core sets the threads of this process may run on (one set once pinned)."""
    sets: set[tuple[int, ...]] = set()
    for tid in os.listdir("/proc/self/task"):
        try:
            sets.add(tuple(sorted(os.sched_getaffinity(int(tid)))))
        except OSError:
            pass
    return [list(s) for s in sorted(sets)]
