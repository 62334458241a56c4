from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RankShard(_message.Message):
    __slots__ = ("rank", "endpoint", "block_ids", "host_id")
    RANK_FIELD_NUMBER: _ClassVar[int]
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    BLOCK_IDS_FIELD_NUMBER: _ClassVar[int]
    HOST_ID_FIELD_NUMBER: _ClassVar[int]
    rank: int
    endpoint: str
    block_ids: _containers.RepeatedScalarFieldContainer[int]
    host_id: str
    def __init__(self, rank: _Optional[int] = ..., endpoint: _Optional[str] = ..., block_ids: _Optional[_Iterable[int]] = ..., host_id: _Optional[str] = ...) -> None: ...

class KVHandle(_message.Message):
    __slots__ = ("request_id", "num_tokens", "block_size", "num_layers", "num_kv_heads", "head_dim", "dtype", "tp_size", "shards", "lease_expiry", "stream_chunk_blocks", "lease_token")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    NUM_KV_HEADS_FIELD_NUMBER: _ClassVar[int]
    HEAD_DIM_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    TP_SIZE_FIELD_NUMBER: _ClassVar[int]
    SHARDS_FIELD_NUMBER: _ClassVar[int]
    LEASE_EXPIRY_FIELD_NUMBER: _ClassVar[int]
    STREAM_CHUNK_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    LEASE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    num_tokens: int
    block_size: int
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: str
    tp_size: int
    shards: _containers.RepeatedCompositeFieldContainer[RankShard]
    lease_expiry: float
    stream_chunk_blocks: int
    lease_token: bytes
    def __init__(self, request_id: _Optional[str] = ..., num_tokens: _Optional[int] = ..., block_size: _Optional[int] = ..., num_layers: _Optional[int] = ..., num_kv_heads: _Optional[int] = ..., head_dim: _Optional[int] = ..., dtype: _Optional[str] = ..., tp_size: _Optional[int] = ..., shards: _Optional[_Iterable[_Union[RankShard, _Mapping]]] = ..., lease_expiry: _Optional[float] = ..., stream_chunk_blocks: _Optional[int] = ..., lease_token: _Optional[bytes] = ...) -> None: ...

class PullRequest(_message.Message):
    __slots__ = ("request_id", "block_ids", "head_start", "head_end", "segments", "tag", "reply_address", "by_index", "lease_token", "local_host")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    BLOCK_IDS_FIELD_NUMBER: _ClassVar[int]
    HEAD_START_FIELD_NUMBER: _ClassVar[int]
    HEAD_END_FIELD_NUMBER: _ClassVar[int]
    SEGMENTS_FIELD_NUMBER: _ClassVar[int]
    TAG_FIELD_NUMBER: _ClassVar[int]
    REPLY_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    BY_INDEX_FIELD_NUMBER: _ClassVar[int]
    LEASE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    LOCAL_HOST_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    block_ids: _containers.RepeatedScalarFieldContainer[int]
    head_start: int
    head_end: int
    segments: _containers.RepeatedScalarFieldContainer[int]
    tag: int
    reply_address: bytes
    by_index: bool
    lease_token: bytes
    local_host: str
    def __init__(self, request_id: _Optional[str] = ..., block_ids: _Optional[_Iterable[int]] = ..., head_start: _Optional[int] = ..., head_end: _Optional[int] = ..., segments: _Optional[_Iterable[int]] = ..., tag: _Optional[int] = ..., reply_address: _Optional[bytes] = ..., by_index: _Optional[bool] = ..., lease_token: _Optional[bytes] = ..., local_host: _Optional[str] = ...) -> None: ...

class LocalPool(_message.Message):
    __slots__ = ("pid", "fd", "inode", "num_blocks", "heads")
    PID_FIELD_NUMBER: _ClassVar[int]
    FD_FIELD_NUMBER: _ClassVar[int]
    INODE_FIELD_NUMBER: _ClassVar[int]
    NUM_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    HEADS_FIELD_NUMBER: _ClassVar[int]
    pid: int
    fd: int
    inode: int
    num_blocks: int
    heads: int
    def __init__(self, pid: _Optional[int] = ..., fd: _Optional[int] = ..., inode: _Optional[int] = ..., num_blocks: _Optional[int] = ..., heads: _Optional[int] = ...) -> None: ...

class LocalReadDone(_message.Message):
    __slots__ = ("copied",)
    COPIED_FIELD_NUMBER: _ClassVar[int]
    copied: bool
    def __init__(self, copied: _Optional[bool] = ...) -> None: ...

class PullResponse(_message.Message):
    __slots__ = ("ok", "error", "payload_bytes", "first_token", "local", "local_block_ids")
    OK_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_BYTES_FIELD_NUMBER: _ClassVar[int]
    FIRST_TOKEN_FIELD_NUMBER: _ClassVar[int]
    LOCAL_FIELD_NUMBER: _ClassVar[int]
    LOCAL_BLOCK_IDS_FIELD_NUMBER: _ClassVar[int]
    ok: bool
    error: str
    payload_bytes: int
    first_token: int
    local: LocalPool
    local_block_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, ok: _Optional[bool] = ..., error: _Optional[str] = ..., payload_bytes: _Optional[int] = ..., first_token: _Optional[int] = ..., local: _Optional[_Union[LocalPool, _Mapping]] = ..., local_block_ids: _Optional[_Iterable[int]] = ...) -> None: ...
