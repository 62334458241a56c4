"""Moving KV blocks between pools: interfaces.py (errors, states), source.py and puller.py (the two sides)."""

from kv_transfer.backends import make_puller, make_source, serve_on_running_loop

__all__ = ["make_puller", "make_source", "serve_on_running_loop"]
