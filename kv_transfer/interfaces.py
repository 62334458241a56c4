"""What every part of kv_transfer (and its callers) shares: the error a pull raises, the states a
pull goes through, the wire limits and the cache layout both sides assert.

Nothing here imports another kv_transfer module, so handle/payload/reshard/grants and the two
sides (source.py, puller.py) all build on it without a cycle.
"""

from __future__ import annotations

import enum

import torch

from engine.tp import kv_heads_per_rank, tp_kv_error

MAX_REQUEST_BYTES = 1 << 20  # a PullRequest larger than this is rejected unread
MAX_SEGMENTS = 64  # payload messages per pull
MAX_TRACKED_STATES = 4096  # per puller; the oldest transfer states are dropped first


class TransferError(RuntimeError):
    """A pull failed: bad metadata, refused by the source, peer gone, or timed out."""


class TransferState(enum.Enum):
    PENDING = "pending"  # pull() called (or not yet), nothing sent
    CONNECTING = "connecting"  # reaching a source / forming a channel
    TRANSFERRING = "transferring"  # a source accepted; payload in flight
    DONE = "done"  # every shard written into the destination blocks
    FAILED = "failed"  # TransferError raised; destination blocks hold garbage


class RankKV:
    """One TP rank's KV cache as either side of a transfer holds it (layout checked on entry)."""

    def __init__(self, kv: torch.Tensor, rank: int, tp_size: int, num_kv_heads: int) -> None:
        check_layout(kv, rank, tp_size, num_kv_heads)
        self.kv = kv  # [N, L, 2, H_rank, B, D]
        self.rank = rank
        self.tp_size = tp_size
        self.num_kv_heads = num_kv_heads


def check_layout(kv: torch.Tensor, rank: int, tp_size: int, num_kv_heads: int) -> None:
    """kv must be [num_blocks, num_layers, 2, heads of the rank, block_size, head_dim] (heads of
    the rank: num_kv_heads / tp_size, or 1 when tp_size exceeds num_kv_heads)."""
    if kv.dim() != 6 or kv.shape[2] != 2 or not kv.is_contiguous():
        raise TransferError(f"kv must be a contiguous 6-d [N, L, 2, H, B, D] tensor, got {tuple(kv.shape)}")
    if tp_size <= 0 or not 0 <= rank < tp_size or num_kv_heads <= 0 or tp_kv_error(num_kv_heads, tp_size):
        raise TransferError(f"bad rank {rank} / tp_size {tp_size} for {num_kv_heads} heads")
    heads = kv_heads_per_rank(num_kv_heads, tp_size)
    if kv.shape[3] != heads:
        raise TransferError(f"kv has {kv.shape[3]} heads, rank of {tp_size} needs {heads}")
