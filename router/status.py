"""GetStatus: the registry as a StatusResponse, and its table / JSON forms for `pdserve status`."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from google.protobuf.message import Message
from pdserve.v1 import router_pb2

from router.admission import Admission
from router.registry import DECODE, PREFILL, Registry, Replica


def _replica(r: Replica, now: float) -> router_pb2.ReplicaStatus:
    s = r.status
    return router_pb2.ReplicaStatus(
        replica_id=s.replica_id, address=s.address, ready=s.ready, running=s.running, queued=s.queued,
        kv_blocks_total=s.kv_blocks_total, kv_blocks_free=s.kv_blocks_free,
        kv_blocks_leased=s.kv_blocks_leased, quantization=s.quantization, weight_bytes=s.weight_bytes,
        tp_size=s.tp_size, queued_prompt_tokens=s.queued_prompt_tokens, draining=s.draining,
        seconds_since_heartbeat=max(0.0, now - r.last_seen), kv_pulls=s.kv_pulls,
        kv_pull_bytes=s.kv_pull_bytes, kv_pull_seconds=s.kv_pull_seconds,
    )


def _pool(replicas: Sequence[Replica], now: float) -> router_pb2.PoolStatus:
    pool = router_pb2.PoolStatus(replicas=[_replica(r, now) for r in sorted(replicas, key=lambda r: r.replica_id)])
    for r in pool.replicas:
        pool.ready_replicas += int(r.ready and not r.draining)
        pool.running += r.running
        pool.queued += r.queued
        pool.kv_blocks_total += r.kv_blocks_total
        pool.kv_blocks_free += r.kv_blocks_free
        pool.kv_blocks_leased += r.kv_blocks_leased
    return pool


def build_status(registry: Registry, admission: Admission, vocab_size: int = 0,
                 context_len: int = 0) -> router_pb2.StatusResponse:
    now = registry.clock()
    return router_pb2.StatusResponse(
        vocab_size=vocab_size,
        context_len=context_len,
        prefill=_pool(registry.pool(PREFILL), now),
        decode=_pool(registry.pool(DECODE), now),
        inflight_requests=admission.inflight,
        queued_prompt_tokens=admission.queued_prompt_tokens,
        serving=registry.serving(),
        scaling_decisions=list(registry.scaling),
    )


_COLUMNS = ("pool", "replica", "address", "ready", "tp", "run", "queue", "kv free/total", "leased",
            "quant", "weights", "kv pulls")
SHOWN_DECISIONS = 5


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f}MiB" if n else "-"


def _pulls(r: router_pb2.ReplicaStatus) -> str:
    if not r.kv_pulls:
        return "-"
    return f"{r.kv_pulls} ({r.kv_pull_seconds / r.kv_pulls * 1e3:.1f}ms, {_mib(r.kv_pull_bytes)})"


def _decision(d: router_pb2.ScalingDecision) -> str:
    when = time.strftime("%H:%M:%S", time.localtime(d.time))
    return f"  {when} {d.pool}: {d.from_replicas} -> {d.to_replicas} replicas ({d.reason})"


def _rows(name: str, pool: router_pb2.PoolStatus) -> list[tuple[str, ...]]:
    rows: list[tuple[str, ...]] = [
        (name, r.replica_id, r.address, "draining" if r.draining else ("yes" if r.ready else "no"),
         str(r.tp_size), str(r.running), str(r.queued), f"{r.kv_blocks_free}/{r.kv_blocks_total}",
         str(r.kv_blocks_leased), r.quantization or "none", _mib(r.weight_bytes), _pulls(r))
        for r in pool.replicas
    ]
    rows.append((name, f"total ({pool.ready_replicas} ready)", "", "", "", str(pool.running), str(pool.queued),
                 f"{pool.kv_blocks_free}/{pool.kv_blocks_total}", str(pool.kv_blocks_leased), "", "", ""))
    return rows


def format_status(resp: router_pb2.StatusResponse) -> str:
    """A plain-text table: one row per replica, a total row per pool, the router's counts, then the
    latest autoscaling decisions."""
    rows = [_COLUMNS, *_rows("prefill", resp.prefill), *_rows("decode", resp.decode)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(_COLUMNS))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    lines.append(
        f"serving: {'yes' if resp.serving else 'no'}   in flight: {resp.inflight_requests}   "
        f"queued prompt tokens: {resp.queued_prompt_tokens}"
    )
    if resp.scaling_decisions:
        lines.append("scaling decisions (latest last):")
        lines += [_decision(d) for d in resp.scaling_decisions[-SHOWN_DECISIONS:]]
    return "\n".join(lines)


def _to_dict(msg: Message) -> dict[str, Any]:
    """Every field (defaults included) with plain JSON numbers (proto JSON quotes 64-bit ints)."""
    out: dict[str, Any] = {}
    for field in msg.DESCRIPTOR.fields:
        value = getattr(msg, field.name)
        if field.message_type is None:
            out[field.name] = list(value) if field.is_repeated else value
        elif field.is_repeated:
            out[field.name] = [_to_dict(v) for v in value]
        else:
            out[field.name] = _to_dict(value)
    return out


def status_json(resp: router_pb2.StatusResponse) -> dict[str, Any]:
    """The StatusResponse as a JSON-ready dict (proto field names): `json.dumps(status_json(r))`."""
    return _to_dict(resp)
