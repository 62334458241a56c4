"""A request with kv_transfer.streaming on: decode pulls the KV while the prompt is still prefilled.

Lifecycle (steps 3-6 of a request's life, overlapped):
  1. `PrefillStream` on the picked prefill replica; its early event is a streamed KVHandle (the
     request's blocks exist, none or few computed). From here the lease is ours (flow.Lease).
  2. `Decode` opens at once on the picked decode replica with that handle (first_token unknown): it
     reserves blocks and pulls chunk by chunk, each pull answered once prefill computed the chunk;
     the last pull carries the first token.
  3. The prefill stream's last event is the first token: it goes to the client first (TTFT is still
     prefill's); then the decode stream's tokens follow, as in router/flow.py.
  4. Anything that fails before the client saw a token falls back to the plain path (flow.py), which
     retries on other replicas; a decode failure after the first token goes through flow._decode
     (retries, migration). Cancels and early finishes cancel both calls; the lease is given back.
Colocated mode and conditional disaggregation (router/local.py) do not stream: they need no transfer.
"""

from __future__ import annotations

import grpc
from pdserve.v1 import worker_pb2

from router import flow
from router.admission import Ticket
from router.local import pick_colocated, pick_local_prefill
from router.observe import RequestClock
from router.output import OutputState
from router.picker import pick_decode, pick_prefill
from router.prefix import hash_blocks
from router.registry import DECODE, PREFILL, Replica
from router.validate import Prepared


def _pick(prep: Prepared, deps: flow.FlowDeps) -> Replica | None:
    """The prefill replica to stream from; None when the request should not stream."""
    cfg, prefill_ready = deps.config, deps.registry.ready(PREFILL)
    decoders = deps.registry.ready(DECODE)
    if pick_local_prefill(decoders, prep.prompt_ids, cfg) or pick_colocated(
            prefill_ready, decoders, cfg.affinity_max_imbalance_tokens):
        return None
    hashes = hash_blocks(prep.prompt_ids, cfg.block_size, cfg.affinity_blocks)
    replica = pick_prefill(prefill_ready, hashes, deps.memory, cfg.affinity_max_imbalance_tokens)
    if replica is not None:
        deps.memory.record(hashes, replica.replica_id)
    return replica


async def _read(replica: Replica, deps: flow.FlowDeps, call: grpc.aio.UnaryStreamCall
                ) -> worker_pb2.PrefillResponse | None:
    """The next PrefillStream event; None when the stream failed or ended early."""
    try:
        message = await flow._watched(replica, deps, call.read())
    except (grpc.aio.AioRpcError, flow.ReplicaLost):
        return None
    return None if message is grpc.aio.EOF else message


async def run_streamed(prep: Prepared, deps: flow.FlowDeps, write: flow.Write, remaining: flow.Remaining,
                       lease: flow.Lease, clock: RequestClock, ticket: Ticket) -> bool:
    """Serves the request with streaming; False (nothing sent, nothing held) = use the plain path."""
    prefill = _pick(prep, deps)
    if prefill is None:
        return False
    request = worker_pb2.PrefillRequest(request_id=lease.request_id, prompt_token_ids=prep.prompt_ids,
                                        sampling=prep.sampling)
    lease.replica = prefill
    prefill_call = prefill.prefill.PrefillStream(request, timeout=flow._timeout(remaining))
    decode_call: grpc.aio.UnaryStreamCall | None = None
    try:
        early = await _read(prefill, deps, prefill_call)
        if early is None or not early.early:
            return _abandon(lease, deps)
        decoder = pick_decode(deps.registry.ready(DECODE))
        decode_request = flow._decode_request(lease, prep.prompt_ids, early, prep.sampling, prefill)
        if decoder is not None:
            decode_call = decoder.decode.Decode(decode_request, timeout=flow._timeout(remaining))
        first = await _read(prefill, deps, prefill_call)
        if first is None or first.early:
            return _abandon(lease, deps)
        ticket.prefill_done()
        sent = flow.Sent(OutputState(prep, deps.codec, deps.config.eos_token_ids), write)
        await sent.emit([first.first_token], [first.first_logprob])
        clock.first_token(prefill.replica_id)
        if sent.out.finished:
            return True
        await _continue(prep, first, prefill, decoder, decode_call, sent, deps, remaining, lease, clock)
        decode_call = None  # finished (or handed over and finished) by _continue
        return True
    finally:
        prefill_call.cancel()
        if decode_call is not None:
            decode_call.cancel()


def _abandon(lease: flow.Lease, deps: flow.FlowDeps) -> bool:
    """The prefill stream failed before the first token: free what it may hold and go the plain way
    under a new worker request id (a late release of the old one must not hit the retry)."""
    flow._give_back(lease, deps)
    lease.request_id = f"{lease.request_id}/s"
    return False


async def _continue(prep: Prepared, first: worker_pb2.PrefillResponse, prefill: Replica,
                    decoder: Replica | None, call: grpc.aio.UnaryStreamCall | None, sent: flow.Sent,
                    deps: flow.FlowDeps, remaining: flow.Remaining, lease: flow.Lease,
                    clock: RequestClock) -> None:
    """Streams the already open decode call; on a retryable failure, flow._decode takes over."""
    failed: set[str] = set()
    if decoder is not None and call is not None:
        request = flow._decode_request(lease, prep.prompt_ids, first, prep.sampling, prefill)
        blocks = flow._blocks_needed(len(prep.prompt_ids), prep.sampling.max_tokens, deps.config.block_size)
        try:
            await flow._stream_decode(decoder, request, blocks, sent, deps, remaining, lease, clock, call)
            return
        except flow.Failed as f:
            if f.code not in flow.RETRYABLE:
                raise f.error from None
            failed.add(decoder.replica_id)
            if pick_decode([r for r in deps.registry.ready(DECODE) if r.replica_id not in failed]) is None:
                raise f.error from None  # no other replica: say what went wrong here
    await flow._decode(prep, first, prefill, sent, deps, remaining, lease, clock, failed)
