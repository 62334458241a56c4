"""KVHandle: the plain-data description of a request's KV blocks on the prefill replica.

Built by the prefill worker (one RankShard per TP rank), carried by the router in
`PrefillResponse`/`DecodeRequest` as `pdserve.v1.kv_pb2.KVHandle`, consumed by `KVPuller.pull`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from pdserve.v1 import kv_pb2

from engine.config import DTYPES
from engine.tp import tp_kv_error
from kv_transfer.interfaces import TransferError


def dtype_name(dtype: torch.dtype) -> str:
    """The handle's name of a torch dtype; TransferError if the KV dtype is not supported."""
    for name, known in DTYPES.items():
        if known == dtype:
            return name
    raise TransferError(f"unsupported KV dtype {dtype}")


MAX_LEASE_TOKEN_BYTES = 64


@dataclass(frozen=True, slots=True)
class RankShard:
    rank: int
    endpoint: str  # "host:port" of that rank's KVSource
    block_ids: tuple[int, ...]  # blocks in that rank's cache, in token order
    host_id: str = ""  # the rank's host (kv_transfer.host.HOST_ID); "" = unknown


@dataclass(frozen=True, slots=True)
class KVHandle:
    request_id: str
    num_tokens: int
    block_size: int
    num_layers: int
    num_kv_heads: int  # the model's (rank r holds engine.tp.kv_head_range(num_kv_heads, tp_size, r))
    head_dim: int
    dtype: str  # "float32" | "bfloat16" | "float16"
    tp_size: int  # prefill TP
    shards: tuple[RankShard, ...]
    lease_expiry: float  # unix seconds
    lease_token: bytes = b""  # the lease's secret: a source answers only pulls that carry it

    @property
    def num_blocks(self) -> int:
        """Blocks that hold the handle's tokens (the same count on every rank)."""
        return -(-self.num_tokens // self.block_size)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def validate(self) -> None:
        """Raises TransferError when the metadata is inconsistent."""
        positive = ("num_tokens", "block_size", "num_layers", "num_kv_heads", "head_dim", "tp_size")
        for name in positive:
            if getattr(self, name) <= 0:
                raise TransferError(f"KVHandle.{name} must be > 0, got {getattr(self, name)}")
        if not self.request_id:
            raise TransferError("KVHandle.request_id is empty")
        if self.dtype not in DTYPES:
            raise TransferError(f"KVHandle.dtype {self.dtype!r} not in {sorted(DTYPES)}")
        error = tp_kv_error(self.num_kv_heads, self.tp_size)
        if error is not None:
            raise TransferError(f"KVHandle: {error}")
        if len(self.lease_token) > MAX_LEASE_TOKEN_BYTES:
            raise TransferError(f"KVHandle.lease_token of {len(self.lease_token)} bytes (at most {MAX_LEASE_TOKEN_BYTES})")
        if len(self.shards) != self.tp_size:
            raise TransferError(f"{len(self.shards)} shards for tp_size={self.tp_size}")
        for i, shard in enumerate(self.shards):
            self._validate_shard(i, shard)

    def _validate_shard(self, index: int, shard: RankShard) -> None:
        if shard.rank != index:
            raise TransferError(f"shard {index} has rank {shard.rank} (shards must be in rank order)")
        if not shard.endpoint:
            raise TransferError(f"shard {index} has no endpoint")
        if len(shard.block_ids) != self.num_blocks:
            raise TransferError(
                f"shard {index} has {len(shard.block_ids)} blocks, {self.num_tokens} tokens "
                f"at block_size {self.block_size} need {self.num_blocks}"
            )
        if any(b < 0 for b in shard.block_ids) or len(set(shard.block_ids)) != len(shard.block_ids):
            raise TransferError(f"shard {index} has negative or repeated block ids")

    def to_proto(self) -> kv_pb2.KVHandle:
        return kv_pb2.KVHandle(
            request_id=self.request_id,
            num_tokens=self.num_tokens,
            block_size=self.block_size,
            num_layers=self.num_layers,
            num_kv_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            dtype=self.dtype,
            tp_size=self.tp_size,
            shards=[
                kv_pb2.RankShard(rank=s.rank, endpoint=s.endpoint, block_ids=list(s.block_ids), host_id=s.host_id)
                for s in self.shards
            ],
            lease_expiry=self.lease_expiry,
            lease_token=self.lease_token,
        )

    @classmethod
    def from_proto(cls, msg: kv_pb2.KVHandle) -> KVHandle:
        """Plain conversion; call validate() before trusting the result."""
        return cls(
            request_id=msg.request_id,
            num_tokens=msg.num_tokens,
            block_size=msg.block_size,
            num_layers=msg.num_layers,
            num_kv_heads=msg.num_kv_heads,
            head_dim=msg.head_dim,
            dtype=msg.dtype,
            tp_size=msg.tp_size,
            shards=tuple(
                RankShard(rank=s.rank, endpoint=s.endpoint, block_ids=tuple(s.block_ids), host_id=s.host_id)
                for s in msg.shards
            ),
            lease_expiry=msg.lease_expiry,
            lease_token=msg.lease_token,
        )
