"""Pick a transfer backend by its config name: `ucx` (ucxx) or `torch` (torch.distributed)."""

from __future__ import annotations

import torch

from kv_transfer.puller import KVPuller
from kv_transfer.source import KVSource

BACKENDS = ("ucx", "torch")


def make_source(backend: str, kv: torch.Tensor, rank: int, tp_size: int, num_kv_heads: int) -> KVSource:
    """The prefill side of `backend` over one rank's cache."""
    if backend == "ucx":
        from kv_transfer.ucx import UCXSource

        return UCXSource(kv, rank, tp_size, num_kv_heads)
    if backend == "torch":
        from kv_transfer.torch_dist import TorchDistSource

        return TorchDistSource(kv, rank, tp_size, num_kv_heads)
    raise ValueError(f"unknown kv_transfer.backend {backend!r}; choose from {', '.join(BACKENDS)}")


def make_puller(backend: str, kv: torch.Tensor, rank: int, tp_size: int, num_kv_heads: int,
                same_host_read: bool = True) -> KVPuller:
    """The decode side of `backend` over one rank's cache (same_host_read: ucx only)."""
    if backend == "ucx":
        from kv_transfer.ucx import UCXConfig, UCXPuller

        return UCXPuller(kv, rank, tp_size, num_kv_heads, UCXConfig(same_host_read=same_host_read))
    if backend == "torch":
        from kv_transfer.torch_dist import TorchDistPuller

        return TorchDistPuller(kv, rank, tp_size, num_kv_heads)
    raise ValueError(f"unknown kv_transfer.backend {backend!r}; choose from {', '.join(BACKENDS)}")


def serve_on_running_loop(backend: str) -> None:
    """A long-lived serving process (a Serve replica, a TP rank's actor) calls this from its loop
    before it makes a source or puller: the `ucx` backend then runs on that loop, with no hop to a
    thread of its own per pull (kv_transfer/ucx_loop.py). Other backends need nothing."""
    if backend == "ucx":
        from kv_transfer import ucx_loop

        ucx_loop.serve_on_running_loop()
