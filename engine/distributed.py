"""Tensor-parallel step fan-out: rank 0 schedules, every rank runs the same forward.

Rank 0 sends each step's inputs with :class:`StepBroadcaster` as two tensor broadcasts (no
pickle): an int64 header ``[command, T, B, max_blocks]`` and one int64 payload holding
``input_ids[T] | positions[T] | query_lens[B] | seq_lens[B] | block_tables[B*max_blocks] |
slot_mapping[T]``. Followers (:func:`run_follower`) loop: receive -> forward (the all-reduces
happen inside the model) -> repeat, until the stop command. Sampling happens on rank 0 only.

A follower exposes its KV tensor (``Follower.kv`` / ``kv_ready_callback``) so a prefill replica
can serve KV pulls from every rank's cache on another thread.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from engine.attention import AttnMetadata
from engine.kv_cache import CacheConfig, allocate_kv
from engine.model import build_engine_model
from engine.model_runner import StepInputs
from engine.tp import TPInfo

CMD_STOP, CMD_STEP = 0, 1
HEADER_LEN = 4


@dataclass(frozen=True, slots=True)
class GroupSpec:
    """How a rank of a serving replica (prefill or decode) joins its TP group."""

    init_method: str  # "tcp://host:port" of rank 0's rendezvous
    world_size: int
    cache: CacheConfig


# Followers wait for rank 0's next step however long the replica stays idle (torch's default 30 min
# collective timeout would end their loop in an idle cluster); rank 0 only ever waits for a step.
FOLLOWER_TIMEOUT = timedelta(hours=24)
RANK0_TIMEOUT = timedelta(minutes=10)


def init_group(spec: GroupSpec, rank: int, device: str) -> TPInfo:
    """Joins the group's default process group: gloo on CPU, NCCL on GPU."""
    backend = "nccl" if device == "cuda" else "gloo"
    timeout = RANK0_TIMEOUT if rank == 0 else FOLLOWER_TIMEOUT
    dist.init_process_group(backend, init_method=spec.init_method, rank=rank, world_size=spec.world_size,
                            timeout=timeout)
    return TPInfo(rank=rank, world_size=spec.world_size, group=dist.group.WORLD)


def free_port(host: str) -> int:
    """A port on host that was free a moment ago (for a rendezvous)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _broadcast(t: torch.Tensor, tp: TPInfo) -> None:
    dist.broadcast(t, group=tp.group, group_src=0)


def pack_step(inputs: StepInputs) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (header [4] int64, payload [3T + 2B + B*max_blocks] int64) on the inputs' device."""
    meta = inputs.meta
    device = inputs.input_ids.device
    b, width = meta.block_tables.shape
    lens = torch.tensor(meta.query_lens + meta.seq_lens, dtype=torch.int64, device=device)  # [2B]
    payload = torch.cat(
        [inputs.input_ids, inputs.positions, lens, meta.block_tables.flatten(), meta.slot_mapping]
    )
    header = torch.tensor([CMD_STEP, inputs.input_ids.numel(), b, width], dtype=torch.int64, device=device)
    return header, payload


def unpack_step(header: list[int], payload: torch.Tensor) -> StepInputs:
    _, t, b, width = header
    ids, pos, lens, tables, slots = payload.split([t, t, 2 * b, b * width, t])
    lens_list = lens.tolist()
    meta = AttnMetadata(
        query_lens=lens_list[:b],
        seq_lens=lens_list[b:],
        block_tables=tables.view(b, width),  # [B, max_blocks]
        slot_mapping=slots,  # [T]
    )
    return StepInputs(ids, pos, meta)


class StepBroadcaster:
    """Used by rank 0: sends each step's inputs (and finally the stop command) to its TP group."""

    def __init__(self, tp: TPInfo, device: torch.device | str = "cpu") -> None:
        self.tp = tp
        self.device = torch.device(device)
        self.stopped = False

    def send(self, inputs: StepInputs) -> None:
        header, payload = pack_step(inputs)
        _broadcast(header, self.tp)
        _broadcast(payload, self.tp)

    def stop(self) -> None:
        if not self.stopped:
            self.stopped = True
            header = torch.zeros(HEADER_LEN, dtype=torch.int64, device=self.device)
            _broadcast(header, self.tp)


def receive_step(tp: TPInfo, device: torch.device) -> StepInputs | None:
    """Follower side of :meth:`StepBroadcaster.send`; None on the stop command."""
    header = torch.empty(HEADER_LEN, dtype=torch.int64, device=device)
    _broadcast(header, tp)
    values = header.tolist()
    if values[0] == CMD_STOP:
        return None
    _, t, b, width = values
    payload = torch.empty(3 * t + 2 * b + b * width, dtype=torch.int64, device=device)
    _broadcast(payload, tp)
    return unpack_step(values, payload)


class Follower:
    """A non-zero TP rank: this rank's model slice and KV cache, driven by rank 0's steps."""

    def __init__(
        self,
        model_dir: str | Path,
        dtype: torch.dtype,
        tp: TPInfo,
        cache_config: CacheConfig,
        *,
        device: torch.device | str = "cpu",
        quantization: str = "none",
    ) -> None:
        self.tp = tp
        self.device = torch.device(device)
        self.model = build_engine_model(model_dir, dtype, tp, self.device, quantization)
        self.kv = allocate_kv(self.model.config, cache_config, tp.world_size, dtype, self.device)
        self.num_steps = 0

    @torch.inference_mode()
    def run(self) -> None:
        """Receive -> forward, until rank 0 sends the stop command."""
        while (inputs := receive_step(self.tp, self.device)) is not None:
            self.model(inputs.input_ids, inputs.positions, inputs.meta, self.kv)
            self.num_steps += 1


def run_follower(
    model_dir: str | Path,
    dtype: torch.dtype,
    tp: TPInfo,
    cache_config: CacheConfig,
    kv_ready_callback: Callable[[torch.Tensor], None] | None = None,
    *,
    device: torch.device | str = "cpu",
    quantization: str = "none",
) -> None:
    """Build this rank's model and cache, hand the cache to ``kv_ready_callback``, serve steps."""
    follower = Follower(model_dir, dtype, tp, cache_config, device=device, quantization=quantization)
    if kv_ready_callback is not None:
        kv_ready_callback(follower.kv)
    follower.run()
