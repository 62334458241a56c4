"""Conventions for `RankShard.endpoint` (kv.proto) that the router and the workers both read.

Hand-written (not generated): a .proto file cannot declare a string constant.
"""

# A KVHandle whose every shard's endpoint starts with this names KV that stays in the engine that
# prefilled it (a colocated replica, `local://<token>`): only that replica can decode it, by adopting
# the blocks, with no transfer.
LOCAL_KV_SCHEME = "local://"
