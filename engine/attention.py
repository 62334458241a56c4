"""Paged attention over a mixed batch of prefill chunks and decode tokens (torch SDPA).

One step's tokens are the concatenation of every sequence's new tokens. Each layer
1. writes the new tokens' K/V into the paged cache at `meta.slot_mapping`, then
2. attends: all query_len == 1 sequences in ONE batched SDPA over their gathered blocks
   (length mask), each prefill chunk in its own SDPA (causal within the chunk, full
   attention to the sequence's earlier cached tokens).

Cache layout (docs/structures.md): kv [num_blocks, num_layers, 2, H_local, block_size, D];
a layer sees kv[:, l] -> [num_blocks, 2, H, block_size, D].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(slots=True)
class AttnMetadata:
    """What the scheduler tells the model about one forward step."""

    query_lens: list[int]  # new tokens of each sequence in this step (prefill chunk or 1)
    seq_lens: list[int]  # tokens in context after this step (cached + new)
    block_tables: torch.Tensor  # [B, max_blocks] int64, padded with 0
    slot_mapping: torch.Tensor  # [T] int64: block_id * block_size + offset of each new token


@dataclass(frozen=True, slots=True)
class PrefillSpan:
    """One sequence with query_len > 1: rows [start, start + query_len) of the step."""

    start: int
    query_len: int
    seq_len: int
    block_table: torch.Tensor  # [num_blocks_needed] int64
    mask: torch.Tensor | None  # [query_len, seq_len] bool; None = plain causal, no cached prefix


@dataclass(frozen=True, slots=True)
class DecodeBatch:
    """Every query_len == 1 sequence of the step, attended in one SDPA."""

    rows: torch.Tensor  # [Bd] int64 token rows in the step
    block_tables: torch.Tensor  # [Bd, nb] int64
    mask: torch.Tensor  # [Bd, 1, 1, nb * block_size] bool, True = attend


class GatherBuffers:
    """Reused memory for the decode batch's K/V gather: K, V and a scratch buffer, grown on demand.

    Every layer of every step gathers tensors of the same size; a fresh allocation of tens of MB
    each time costs more in page faults than the copy itself (measured: a batch-64 decode step
    ~500 ms with reused buffers, 640-1400 ms allocating), so the model keeps them and each layer
    overwrites them.
    """

    def __init__(self) -> None:
        self._bufs: list[torch.Tensor] = []

    def get(self, numel: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        bufs = self._bufs
        if not bufs or bufs[0].numel() < numel or bufs[0].dtype != like.dtype or bufs[0].device != like.device:
            self._bufs = bufs = [torch.empty(numel, dtype=like.dtype, device=like.device) for _ in range(3)]
        k, v, scratch = (b[:numel] for b in bufs)
        return k, v, scratch


@dataclass(frozen=True, slots=True)
class AttnPlan:
    """Per-step tensors derived once from AttnMetadata and shared by every layer."""

    block_size: int
    block_ids: torch.Tensor  # [T] int64 (slot // block_size)
    block_offsets: torch.Tensor  # [T] int64 (slot % block_size)
    prefills: tuple[PrefillSpan, ...]
    decode: DecodeBatch | None
    buffers: GatherBuffers | None = None  # reused by _attend_decode; None = allocate per layer


def _window_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    # q_pos: [..., Q, 1], k_pos: [..., 1, K] -> [..., Q, K] bool
    mask = k_pos <= q_pos
    if window is not None:
        mask &= k_pos > q_pos - window
    return mask


def _prefill_span(
    meta: AttnMetadata, i: int, start: int, block_size: int, window: int | None
) -> PrefillSpan:
    q_len, s_len = meta.query_lens[i], meta.seq_lens[i]
    num_blocks = -(-s_len // block_size)
    table = meta.block_tables[i, :num_blocks]
    device = meta.block_tables.device
    mask = None
    if q_len != s_len or (window is not None and s_len > window):
        q_pos = torch.arange(s_len - q_len, s_len, device=device)[:, None]  # [Q, 1]
        k_pos = torch.arange(s_len, device=device)[None, :]  # [1, K]
        mask = _window_mask(q_pos, k_pos, window)
    return PrefillSpan(start, q_len, s_len, table, mask)


def _decode_batch(
    meta: AttnMetadata, seqs: list[int], rows: list[int], block_size: int, window: int | None
) -> DecodeBatch:
    device = meta.block_tables.device
    max_len = max(meta.seq_lens[i] for i in seqs)
    num_blocks = -(-max_len // block_size)
    idx = torch.tensor(seqs, device=device)
    lens = torch.tensor([meta.seq_lens[i] for i in seqs], device=device)[:, None]  # [Bd, 1]
    k_pos = torch.arange(num_blocks * block_size, device=device)[None, :]  # [1, L]
    mask = _window_mask(lens - 1, k_pos, window)  # [Bd, L]
    return DecodeBatch(
        rows=torch.tensor(rows, device=device),
        block_tables=meta.block_tables[idx, :num_blocks],
        mask=mask[:, None, None, :],
    )


def plan_attention(meta: AttnMetadata, block_size: int, window: int | None = None,
                   buffers: GatherBuffers | None = None) -> AttnPlan:
    """Derive the per-step tensors once per forward (no device syncs: lens are Python ints)."""
    prefills: list[PrefillSpan] = []
    decode_seqs: list[int] = []
    decode_rows: list[int] = []
    start = 0
    for i, q_len in enumerate(meta.query_lens):
        if q_len == 1:
            decode_seqs.append(i)
            decode_rows.append(start)
        else:
            prefills.append(_prefill_span(meta, i, start, block_size, window))
        start += q_len
    slots = meta.slot_mapping
    decode = _decode_batch(meta, decode_seqs, decode_rows, block_size, window) if decode_seqs else None
    return AttnPlan(block_size, slots // block_size, slots % block_size, tuple(prefills), decode, buffers)


def write_kv(kv_layer: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: AttnPlan) -> None:
    """Store the step's new K/V. kv_layer: [NB, 2, H, BS, D]; k, v: [T, H, D]."""
    kv_layer[plan.block_ids, 0, :, plan.block_offsets] = k.to(kv_layer.dtype)
    kv_layer[plan.block_ids, 1, :, plan.block_offsets] = v.to(kv_layer.dtype)


def _gather(cache: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    # cache: [NB, H, BS, D], table: [..., nb] -> [..., H, nb * BS, D]
    # index_select on the flat table: several times faster than cache[table] on a strided view
    blocks = cache.index_select(0, table.reshape(-1))  # [(...) * nb, H, BS, D]
    blocks = blocks.view(*table.shape, *cache.shape[1:])  # [..., nb, H, BS, D]
    return blocks.transpose(-4, -3).flatten(-3, -2)  # [..., H, nb * BS, D]


def _attend_prefill(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_layer: torch.Tensor, span: PrefillSpan
) -> torch.Tensor:
    rows = slice(span.start, span.start + span.query_len)
    q_s = q[rows].transpose(0, 1)[None]  # [1, Hq, Q, D]
    if span.mask is None:  # whole prompt in this chunk: attend to the fresh K/V
        k_s = k[rows].transpose(0, 1)[None]  # [1, H, Q, D]
        v_s = v[rows].transpose(0, 1)[None]
        out = F.scaled_dot_product_attention(q_s, k_s, v_s, is_causal=True, enable_gqa=True)
    else:
        k_s = _gather(kv_layer[:, 0], span.block_table)[None, :, : span.seq_len].to(q.dtype)
        v_s = _gather(kv_layer[:, 1], span.block_table)[None, :, : span.seq_len].to(q.dtype)
        out = F.scaled_dot_product_attention(q_s, k_s, v_s, attn_mask=span.mask, enable_gqa=True)
    return out[0].transpose(0, 1)  # [Q, Hq, D]


def _gather_into(cache: torch.Tensor, table: torch.Tensor, out: torch.Tensor, scratch: torch.Tensor
                 ) -> torch.Tensor:
    # cache: [NB, H, BS, D], table: [Bd, nb]; out, scratch: flat buffers -> out as [Bd, H, nb * BS, D]
    # (index_select along dim 0 reads only the listed blocks; along a transposed dim it would first
    # copy the whole cache layer)
    bd, nb = table.shape
    heads, block_size, head_dim = cache.shape[1:]
    blocks = scratch.view(bd * nb, heads, block_size, head_dim)
    torch.index_select(cache, 0, table.reshape(-1), out=blocks)
    dst = out.view(bd, heads, nb, block_size, head_dim)
    dst.copy_(blocks.view(bd, nb, heads, block_size, head_dim).transpose(1, 2))
    return out.view(bd, heads, nb * block_size, head_dim)


def _attend_decode(q: torch.Tensor, kv_layer: torch.Tensor, batch: DecodeBatch,
                   buffers: GatherBuffers | None) -> torch.Tensor:
    num_kv_heads, head_dim = kv_layer.shape[2], kv_layer.shape[4]
    bd = batch.rows.shape[0]
    # GQA without repeating K/V: a kv head's query heads become its "query length".
    q_d = q[batch.rows].view(bd, num_kv_heads, -1, head_dim)  # [Bd, H, n_rep, D]
    numel = batch.block_tables.numel() * kv_layer[0, 0].numel()
    k_buf, v_buf, scratch = (buffers or GatherBuffers()).get(numel, kv_layer)
    k_d = _gather_into(kv_layer[:, 0], batch.block_tables, k_buf, scratch).to(q.dtype)  # [Bd, H, L, D]
    v_d = _gather_into(kv_layer[:, 1], batch.block_tables, v_buf, scratch).to(q.dtype)
    out = F.scaled_dot_product_attention(q_d, k_d, v_d, attn_mask=batch.mask)  # [Bd, H, n_rep, D]
    return out.reshape(bd, -1, head_dim)  # [Bd, Hq, D]


def paged_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_layer: torch.Tensor, plan: AttnPlan
) -> torch.Tensor:
    """q: [T, Hq, D], k/v: [T, H, D] (this step, post-RoPE), kv_layer: [NB, 2, H, BS, D].

    Writes k/v into the cache, then returns attention output [T, Hq, D].
    """
    write_kv(kv_layer, k, v, plan)
    out = torch.empty_like(q)
    for span in plan.prefills:
        out[span.start : span.start + span.query_len] = _attend_prefill(q, k, v, kv_layer, span)
    if plan.decode is not None:
        out[plan.decode.rows] = _attend_decode(q, kv_layer, plan.decode, plan.buffers)
    return out
