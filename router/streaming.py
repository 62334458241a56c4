"""A request with kv_transfer.streaming on: decode pulls the KV while the prompt is still prefilled.

Lifecycle (steps 2-4 of router/flow.py, overlapped), as calls on the request's RequestRun:
  1. `PrefillStream` on the picked prefill replica; its early event is a streamed KVHandle (the
     request's blocks exist, none or few computed). From here the lease is ours (`run.lease`).
  2. `Decode` opens at once on the picked decode replica with that handle (first_token unknown): it
     reserves blocks and pulls chunk by chunk, each pull answered once prefill computed the chunk;
     the last pull carries the first token.
  3. The prefill stream's last event is the first token: it goes to the client first (TTFT is still
     prefill's); then the open decode call goes to `run.stream_decode`, as on the plain path.
  4. Anything that fails before the client saw a token falls back to the plain path, which retries
     on other replicas; a decode failure after the first token goes to `run.decode` (retries,
     migration). Cancels and early finishes cancel both calls; the lease is given back.
Colocated mode and conditional disaggregation (router/picker.py) do not stream: they need no transfer.
"""

from __future__ import annotations

import grpc
from pdserve.v1 import worker_pb2

from router.calls import RETRYABLE, Failed, ReplicaLost
from router.picker import hash_blocks, pick_colocated, pick_decode, pick_local_prefill, pick_prefill
from router.registry import DECODE, PREFILL, Replica
from router.request_run import RequestRun


async def run_streamed(run: RequestRun) -> bool:
    """Serves the request with streaming; False (nothing sent, nothing held) = use the plain path."""
    prefill = _pick(run)
    if prefill is None:
        return False
    prep, lease = run.prep, run.lease
    request = worker_pb2.PrefillRequest(request_id=lease.request_id, prompt_token_ids=prep.prompt_ids,
                                        sampling=prep.sampling)
    lease.replica = prefill
    prefill_call = prefill.prefill.PrefillStream(request, timeout=run.timeout())
    decode_call: grpc.aio.UnaryStreamCall | None = None
    try:
        early = await _read(run, prefill, prefill_call)
        if early is None or not early.early:
            return _abandon(run)
        decoder = pick_decode(run.deps.registry.ready(DECODE))
        if decoder is not None:
            decode_request = run.decode_request(prep.prompt_ids, early, prep.sampling, prefill)
            decode_call = decoder.decode.Decode(decode_request, timeout=run.timeout())
        first = await _read(run, prefill, prefill_call)
        if first is None or first.early:
            return _abandon(run)
        await run.first_token(first, prefill)
        if run.finished:
            return True
        await _continue(run, first, prefill, decoder, decode_call)
        decode_call = None  # finished (or handed over and finished) by _continue
        return True
    finally:
        prefill_call.cancel()
        if decode_call is not None:
            decode_call.cancel()


def _pick(run: RequestRun) -> Replica | None:
    """The prefill replica to stream from; None when the request should not stream."""
    cfg, registry, prompt = run.deps.config, run.deps.registry, run.prep.prompt_ids
    prefill_ready, decoders = registry.ready(PREFILL), registry.ready(DECODE)
    if pick_local_prefill(decoders, prompt, cfg) or pick_colocated(
            prefill_ready, decoders, cfg.affinity_max_imbalance_tokens):
        return None
    hashes = hash_blocks(prompt, cfg.block_size, cfg.affinity_blocks)
    replica = pick_prefill(prefill_ready, hashes, run.deps.memory, cfg.affinity_max_imbalance_tokens)
    if replica is not None:
        run.deps.memory.record(hashes, replica.replica_id)
    return replica


async def _read(run: RequestRun, replica: Replica, call: grpc.aio.UnaryStreamCall
                ) -> worker_pb2.PrefillResponse | None:
    """The next PrefillStream event; None when the stream failed or ended early."""
    try:
        message = await run.watched(replica, call.read())
    except (grpc.aio.AioRpcError, ReplicaLost):
        return None
    return None if message is grpc.aio.EOF else message


def _abandon(run: RequestRun) -> bool:
    """The prefill stream failed before the first token: free what it may hold and go the plain way
    under a new worker request id (a late release of the old one must not hit the retry)."""
    run.give_back()
    run.lease.request_id = f"{run.lease.request_id}/s"
    return False


async def _continue(run: RequestRun, first: worker_pb2.PrefillResponse, prefill: Replica,
                    decoder: Replica | None, call: grpc.aio.UnaryStreamCall | None) -> None:
    """Streams the already open decode call; on a retryable failure, `run.decode` takes over."""
    failed: set[str] = set()
    if decoder is not None and call is not None:
        request = run.decode_request(run.prep.prompt_ids, first, run.prep.sampling, prefill)
        try:
            await run.stream_decode(decoder, request, run.blocks_needed(request), call)
            return
        except Failed as f:
            if f.code not in RETRYABLE:
                raise f.error from None
            failed.add(decoder.replica_id)
            if pick_decode([r for r in run.deps.registry.ready(DECODE) if r.replica_id not in failed]) is None:
                raise f.error from None  # no other replica: say what went wrong here
    await run.decode(first, prefill, failed)
