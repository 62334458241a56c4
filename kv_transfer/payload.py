"""Payload layout of one pull: the source's blocks, cut into segments, one raw message each.

Segment i carries blocks block_ids[off_i : off_i + len_i] of the source, heads [head_start,
head_end), as one contiguous [len_i, L, 2, heads, B, D] tensor. The puller picks the cut
(`plan_segments`) so that, when it takes all of its heads, every segment is a contiguous run on
both sides: the source sends `kv[a:a+n]` as is (zero-copy) and the puller receives straight into
`kv[d:d+n]`. Otherwise the source gathers into one staging tensor and the puller scatters.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kv_transfer.base import MAX_SEGMENTS


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
    kv: torch.Tensor, ids: list[int], segments: list[int], heads: tuple[int, int]
) -> list[torch.Tensor]:
    """One contiguous tensor per segment; views of kv when possible (they must not be freed or
    overwritten until sent: the lease guarantees it)."""
    # kv: [N, L, 2, H, B, D]
    h0, h1 = heads
    full = (h0, h1) == (0, kv.shape[3])
    out, off = [], 0
    for n in segments:
        seg = ids[off : off + n]
        off += n
        start = _contiguous_start(seg)
        if start is not None:
            view = kv[start : start + n] if full else kv[start : start + n, :, :, h0:h1]
            out.append(view.contiguous())  # no copy when full
        else:
            idx = torch.tensor(seg, dtype=torch.long, device=kv.device)
            src = kv if full else kv[:, :, :, h0:h1]
            out.append(src.index_select(0, idx).contiguous())  # [n, L, 2, h, B, D]
    return out


@dataclass(slots=True)
class Landing:
    """Where each segment of a pull is received, and how staged segments reach kv."""

    kv: torch.Tensor
    heads: tuple[int, int]  # destination heads [start, end)
    buffers: list[torch.Tensor] = field(default_factory=list)  # contiguous receive targets
    staged: list[tuple[torch.Tensor, list[int]]] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers)

    def finish(self) -> None:
        """Copies staged segments into kv[dst, :, :, heads]."""
        h0, h1 = self.heads
        for buf, dst in self.staged:
            start = _contiguous_start(dst)
            if start is not None:
                self.kv[start : start + len(dst), :, :, h0:h1].copy_(buf)
            else:
                idx = torch.tensor(dst, dtype=torch.long, device=self.kv.device)
                self.kv[:, :, :, h0:h1].index_copy_(0, idx, buf)


def make_landing(
    kv: torch.Tensor, dst_ids: list[int], segments: list[int], heads: tuple[int, int]
) -> Landing:
    """Receive targets for a pull's segments: kv itself for contiguous full-head runs, else staging."""
    # kv: [N, L, 2, H, B, D]
    h0, h1 = heads
    full = (h0, h1) == (0, kv.shape[3])
    landing = Landing(kv, heads)
    off = 0
    for n in segments:
        dst = dst_ids[off : off + n]
        off += n
        start = _contiguous_start(dst)
        if full and start is not None:
            landing.buffers.append(kv[start : start + n])
            continue
        buf = torch.empty((n, *kv.shape[1:3], h1 - h0, *kv.shape[4:]), dtype=kv.dtype, device=kv.device)
        landing.buffers.append(buf)
        landing.staged.append((buf, dst))
    return landing
