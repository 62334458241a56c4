"""Payload layout of one pull: the source's blocks, cut into segments, one raw message each.

Segment i carries blocks block_ids[off_i : off_i + len_i] of the source, heads [head_start,
head_end), as one contiguous [len_i, L, 2, heads, B, D] tensor. The puller picks the cut
(`plan_segments`) so that, when it takes all of its heads, every segment is a contiguous run on
both sides: the source sends `kv[a:a+n]` as is (zero-copy) and the puller receives straight into
`kv[d:d+n]`. Otherwise the source gathers into one staging tensor and the puller scatters.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field

import torch

from kv_transfer.interfaces import MAX_SEGMENTS, TransferError


class StagingPool:
    """Reusable staging buffers: first-touch page faults of a fresh 100 MB tensor cost several
    times the copy itself. Thread-safe; keeps at most max_bytes of idle buffers."""

    def __init__(self, max_bytes: int = 1 << 30) -> None:
        self.max_bytes = max_bytes
        self._free: list[torch.Tensor] = []  # flat (1-d) buffers, idle
        self._lock = threading.Lock()

    def take(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        numel = math.prod(shape)
        with self._lock:
            fits = [b for b in self._free if b.numel() >= numel and (b.dtype, b.device) == (dtype, device)]
            flat = min(fits, key=lambda b: b.numel()) if fits else None
            if flat is not None:
                self._free = [b for b in self._free if b is not flat]
        if flat is None:
            flat = torch.empty(numel, dtype=dtype, device=device)
        return flat[:numel].view(shape)  # its _base is flat

    def give(self, t: torch.Tensor) -> None:
        """Returns a tensor from take() (one never given back is simply garbage-collected)."""
        flat = t._base
        if flat is None or flat.dim() != 1:
            return
        with self._lock:
            idle = sum(b.numel() * b.element_size() for b in self._free)
            fits = idle + flat.numel() * flat.element_size() <= self.max_bytes
            if fits and all(b is not flat for b in self._free):
                self._free.append(flat)


def _runs(ids: list[int]) -> list[int]:
    """Lengths of the maximal runs of consecutive ids."""
    lengths = [1]
    for prev, cur in zip(ids, ids[1:], strict=False):
        if cur == prev + 1:
            lengths[-1] += 1
        else:
            lengths.append(1)
    return lengths


def plan_segments(src_ids: list[int], dst_ids: list[int], full_heads: bool) -> list[int]:
    """Segment lengths: joint contiguous runs when they are few and heads are not re-sharded."""
    joint = [d - s for s, d in zip(src_ids, dst_ids, strict=True)]
    if not full_heads:
        return [len(src_ids)]
    lengths = [1]
    for i in range(1, len(src_ids)):
        if src_ids[i] == src_ids[i - 1] + 1 and joint[i] == joint[i - 1]:
            lengths[-1] += 1
        else:
            lengths.append(1)
    return lengths if len(lengths) <= MAX_SEGMENTS else [len(src_ids)]


def _contiguous_start(ids: list[int]) -> int | None:
    return ids[0] if _runs(ids) == [len(ids)] else None


def source_tensors(
    kv: torch.Tensor, ids: list[int], segments: list[int], heads: tuple[int, int], pool: StagingPool
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """One contiguous tensor per segment, and the staged ones among them (give them back to pool
    once sent). Unstaged ones are views of kv: the lease keeps those blocks unchanged."""
    # kv: [N, L, 2, H, B, D]
    h0, h1 = heads
    full = (h0, h1) == (0, kv.shape[3])
    out, staged, off = [], [], 0
    for n in segments:
        seg = ids[off : off + n]
        off += n
        start = _contiguous_start(seg)
        if full and start is not None:
            out.append(kv[start : start + n])  # zero-copy
            continue
        buf = pool.take((n, *kv.shape[1:3], h1 - h0, *kv.shape[4:]), kv.dtype, kv.device)
        if start is not None:
            buf.copy_(kv[start : start + n, :, :, h0:h1])
        else:
            idx = torch.tensor(seg, dtype=torch.long, device=kv.device)
            torch.index_select(kv if full else kv[:, :, :, h0:h1], 0, idx, out=buf)  # [n, L, 2, h, B, D]
        out.append(buf)
        staged.append(buf)
    return out, staged


@dataclass(slots=True)
class Landing:
    """Where each segment of a pull is received, and how staged segments reach kv."""

    kv: torch.Tensor
    heads: tuple[int, int]  # destination heads [start, end)
    pool: StagingPool
    buffers: list[torch.Tensor] = field(default_factory=list)  # contiguous receive targets
    staged: list[tuple[torch.Tensor, list[int]]] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers)

    def expect(self, payload_bytes: int, source: str) -> None:
        """Raises TransferError unless the source announced exactly the bytes these buffers take."""
        if payload_bytes != self.nbytes:
            raise TransferError(f"payload {payload_bytes} B from {source}, expected {self.nbytes} B")

    def finish(self) -> None:
        """Copies staged segments into kv[dst, :, :, heads] and returns the staging buffers.
        (After a failed receive, do not call it: drop the Landing.)"""
        h0, h1 = self.heads
        for buf, dst in self.staged:
            start = _contiguous_start(dst)
            if start is not None:
                self.kv[start : start + len(dst), :, :, h0:h1].copy_(buf)
            else:
                idx = torch.tensor(dst, dtype=torch.long, device=self.kv.device)
                self.kv[:, :, :, h0:h1].index_copy_(0, idx, buf)
            self.pool.give(buf)
        self.staged.clear()


def make_landing(
    kv: torch.Tensor, dst_ids: list[int], segments: list[int], heads: tuple[int, int], pool: StagingPool
) -> Landing:
    """Receive targets for a pull's segments: kv itself for contiguous full-head runs, else staging."""
    # kv: [N, L, 2, H, B, D]
    h0, h1 = heads
    full = (h0, h1) == (0, kv.shape[3])
    landing = Landing(kv, heads, pool)
    off = 0
    for n in segments:
        dst = dst_ids[off : off + n]
        off += n
        start = _contiguous_start(dst)
        if full and start is not None:
            landing.buffers.append(kv[start : start + n])
            continue
        buf = pool.take((n, *kv.shape[1:3], h1 - h0, *kv.shape[4:]), kv.dtype, kv.device)
        landing.buffers.append(buf)
        landing.staged.append((buf, dst))
    return landing
