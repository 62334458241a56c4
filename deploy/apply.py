"""`pdserve apply CONFIG`: change a running deployment without restarting what did not change.

The running `pdserve up` (a Cluster) owns the router and the Serve applications, so `apply` does not
touch them itself: it validates the file, publishes it in Ray's internal key-value store, and waits
for the Cluster's answer (JSON both ways, never pickle):

    pdserve/<namespace>/apply-request   {"id", "source", "config": DeployConfig.to_dict()}
    pdserve/<namespace>/apply-result    {"id", "ok", "message"}

The Cluster turns the difference into a plan (`plan_apply`):
  - router limits (`max_inflight`, `max_queued_prompt_tokens`, `default_max_tokens`, `api_keys`):
    changed in place; requests read them per call.
  - a pool whose keys changed (`prefill.*` / `decode.*` / `kv_transfer.*`) is re-deployed on Serve.
    Replica bounds, autoscaling targets and delays, the KV lease and the transfer timeout are
    live (Serve updates counts and `user_config` in place); anything else (TP size, KV blocks,
    resources, quantization, backend) changes the deployment's version: a rolling restart, where
    each old replica drains (deploy/serve_app.py) so in-flight requests finish.
  - `model.*`, the router's addresses, TLS, heartbeat and migration, `serving_mode`,
    `decode.local_prefill_max_tokens` and `ray.*` need a new `pdserve up`: the apply is refused,
    naming them, and nothing changes.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from typing import Any

from deploy.config import DeployConfig, load_config

ROUTER_LIVE = frozenset({"router.max_inflight", "router.max_queued_prompt_tokens",
                         "router.default_max_tokens", "router.api_keys"})
POOL_KEYS = {"prefill": ("prefill.", "kv_transfer."), "decode": ("decode.", "kv_transfer.")}
# pool keys that also change the router or the kind of replica: a new `pdserve up`
RESTART_POOL_KEYS = frozenset({"decode.local_prefill_max_tokens"})
POLL_SECONDS = 0.25


@dataclass(frozen=True, slots=True)
class ApplyPlan:
    changed: tuple[str, ...]   # dotted keys that differ
    router: bool               # router limits change in place
    pools: tuple[str, ...]     # pools to re-deploy ("prefill", "decode")
    refused: tuple[str, ...]   # keys that need a new `pdserve up`


def plan_apply(changed: list[str]) -> ApplyPlan:
    """What to do for these changed keys (from deploy.config.diff_configs). Anything that is
    neither a live router limit nor a pool key (model, addresses, TLS, serving mode, Ray) is refused."""
    pool_prefixes = tuple(p for prefixes in POOL_KEYS.values() for p in prefixes)
    refused = tuple(k for k in changed if k in RESTART_POOL_KEYS
                    or (k not in ROUTER_LIVE and not k.startswith(pool_prefixes)))
    pools = tuple(p for p, prefixes in POOL_KEYS.items() if any(k.startswith(prefixes) for k in changed))
    return ApplyPlan(tuple(changed), any(k in ROUTER_LIVE for k in changed), pools, refused)


def request_key(namespace: str) -> str:
    return f"pdserve/{namespace}/apply-request"


def result_key(namespace: str) -> str:
    return f"pdserve/{namespace}/apply-result"


def kv_get(key: str) -> dict[str, Any] | None:
    from ray.experimental import internal_kv

    raw = internal_kv._internal_kv_get(key)
    return None if raw is None else json.loads(raw)


def kv_put(key: str, value: dict[str, Any]) -> None:
    from ray.experimental import internal_kv

    internal_kv._internal_kv_put(key, json.dumps(value), overwrite=True)


def _connect(cfg: DeployConfig) -> None:
    import ray

    if not ray.is_initialized():
        ray.init(address=cfg.ray.address or "auto", namespace=cfg.ray.namespace, log_to_driver=False)


def submit(cfg: DeployConfig, source: str, timeout: float = 600.0) -> dict[str, Any]:
    """Publishes cfg for the running Cluster and waits for its answer ({"id", "ok", "message"})."""
    _connect(cfg)
    request_id = uuid.uuid4().hex
    kv_put(request_key(cfg.ray.namespace), {"id": request_id, "source": source, "config": cfg.to_dict()})
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = kv_get(result_key(cfg.ray.namespace))
        if result is not None and result.get("id") == request_id:
            return result
        time.sleep(POLL_SECONDS)
    return {"id": request_id, "ok": False,
            "message": f"no answer from a running pdserve in namespace {cfg.ray.namespace!r} "
                       f"within {timeout:.0f}s (is `pdserve up` running?)"}


def apply(config_path: str, timeout: float = 600.0) -> int:
    """`pdserve apply`: 0 when the running deployment took the file, 1 when it refused it; a
    ConfigError (exit status 2 in the CLI) when the file itself is bad."""
    cfg = load_config(config_path)
    result = submit(cfg, str(config_path), timeout)
    print(result["message"])
    return 0 if result["ok"] else 1
