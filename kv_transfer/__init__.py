"""Moving KV blocks between pools: see kv_transfer/base.py for the interfaces."""

from kv_transfer.backends import make_puller, make_source

__all__ = ["make_puller", "make_source"]
