"""`pdserve apply CONFIG`: change a running deployment without restarting what did not change.

The running `pdserve up` (a Cluster) owns the router and the Serve applications, so `apply` does not
touch them itself: it validates the file and hands it to the Cluster over the router's internal
gRPC address (Registry.Apply, protobuf with the file as JSON, never pickle), which it finds in Ray's
internal key-value store under `pdserve/<namespace>/registry` (written by `pdserve up` when it
serves). The Cluster answers once the change is made or refused; nothing polls on either side.

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
from dataclasses import dataclass

import grpc
from pdserve.v1 import worker_pb2, worker_pb2_grpc

from deploy.config import DeployConfig, load_config

ROUTER_LIVE = frozenset({"router.max_inflight", "router.max_queued_prompt_tokens",
                         "router.default_max_tokens", "router.api_keys"})
POOL_KEYS = {"prefill": ("prefill.", "kv_transfer."), "decode": ("decode.", "kv_transfer.")}
# pool keys that also change the router or the kind of replica: a new `pdserve up`
RESTART_POOL_KEYS = frozenset({"decode.local_prefill_max_tokens"})


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


def registry_key(namespace: str) -> str:
    return f"pdserve/{namespace}/registry"


def publish_registry(namespace: str, address: str) -> None:
    """Where `pdserve apply` finds the running Cluster (call with Ray connected)."""
    from ray.experimental import internal_kv

    internal_kv._internal_kv_put(registry_key(namespace), address, overwrite=True)


def withdraw_registry(namespace: str, address: str) -> None:
    """Forgets the published address if it is still `address` (a newer `pdserve up` may own it)."""
    from ray.experimental import internal_kv

    if internal_kv._internal_kv_get(registry_key(namespace)) == address.encode():
        internal_kv._internal_kv_del(registry_key(namespace))


def _find_registry(cfg: DeployConfig) -> str | None:
    import ray
    from ray.experimental import internal_kv

    if not ray.is_initialized():
        ray.init(address=cfg.ray.address or "auto", namespace=cfg.ray.namespace, log_to_driver=False)
    raw = internal_kv._internal_kv_get(registry_key(cfg.ray.namespace))
    return None if raw is None else raw.decode()


def submit(cfg: DeployConfig, source: str, timeout: float = 600.0) -> worker_pb2.ApplyResult:
    """Hands cfg to the running Cluster and waits for its answer."""
    namespace = cfg.ray.namespace
    address = _find_registry(cfg)
    if address is None:
        return worker_pb2.ApplyResult(ok=False, message=f"no running pdserve in Ray namespace {namespace!r} "
                                                        "(is `pdserve up` running?)")
    request = worker_pb2.ApplyRequest(source=source, config_json=json.dumps(cfg.to_dict()))
    with grpc.insecure_channel(address) as channel:
        try:
            result: worker_pb2.ApplyResult = worker_pb2_grpc.RegistryStub(channel).Apply(request, timeout=timeout)
        except grpc.RpcError as exc:
            return worker_pb2.ApplyResult(
                ok=False, message=f"no answer from the pdserve of namespace {namespace!r} at {address}: "
                                  f"{exc.code().name} {exc.details()} (is `pdserve up` running?)")
    return result


def apply(config_path: str, timeout: float = 600.0) -> int:
    """`pdserve apply`: 0 when the running deployment took the file, 1 when it refused it; a
    ConfigError (exit status 2 in the CLI) when the file itself is bad."""
    cfg = load_config(config_path)
    result = submit(cfg, str(config_path), timeout)
    print(result.message)
    return 0 if result.ok else 1
