"""Which processes share this host's memory: the id a same-host read is offered under, and the
shared KV pool a source offers for it."""

from __future__ import annotations

import os

import torch
from pdserve.v1 import kv_pb2

from engine.kv_cache import shared_pool


def _host_id() -> str:
    """This kernel's boot id and this process's pid namespace: two processes with the same id can
    reach each other through /proc/<pid>. Empty where that does not hold (not Linux)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
        ns = os.stat("/proc/self/ns/pid")
    except OSError:
        return ""
    return f"{boot}/{ns.st_dev}:{ns.st_ino}"


HOST_ID = _host_id()


def local_pool(kv: torch.Tensor) -> kv_pb2.LocalPool | None:
    """The pool a same-host puller may map and copy from itself; None when kv has none."""
    pool = shared_pool(kv)  # only the whole pool allocate_kv made has one, never a view of it
    if pool is None or not HOST_ID:
        return None
    return kv_pb2.LocalPool(pid=pool.pid, fd=pool.fd, inode=pool.inode, num_blocks=kv.shape[0], heads=kv.shape[3])
