"""One Generate request, after validation: admit -> prefill -> first token -> decode -> stream.

Lifecycle and who frees what:
  1. admit (RESOURCE_EXHAUSTED at once when full); the ticket is returned on every exit.
  2. Prefill on the picked replica, with the client's remaining deadline. From the moment the call
     is sent the replica may hold a KV lease for the request ("the lease is ours").
  3. The first token goes to the client at once. If it already ends the request, the lease is
     released (ReleaseKV) and the call ends.
  4. Decode on the picked replica. Its first message means it pulled the KV and released the lease
     itself ("the lease is decode's").
  5. On any exit while the lease is ours (cancel, deadline, error, early finish) the router sends
     ReleaseKV in the background.

With kv_transfer.streaming on, steps 2-4 overlap (router/streaming.py); a request that cannot
stream takes the plain path. The request's state and its steps are a RequestRun
(router/request_run.py), which also says how failures move a request to other replicas.
"""

from __future__ import annotations

import grpc

from router.admission import DuplicateRequest, Overloaded, Ticket
from router.errors import RouterError
from router.request_run import FlowDeps, Remaining, RequestRun, Write
from router.streaming import run_streamed
from router.validate import Prepared


async def run_request(prep: Prepared, deps: FlowDeps, write: Write, remaining: Remaining) -> None:
    """Streams the request's messages through `write`. Raises RouterError for a status to return."""
    ticket = _admit(prep, deps)
    run = RequestRun(prep, deps, write, remaining, ticket)
    try:
        if deps.config.kv_streaming and await run_streamed(run):
            return
        await run_plain(run)
    finally:
        ticket.close()
        run.give_back()


async def run_plain(run: RequestRun) -> None:
    """Prefill, send the first token, decode (each with retries and migration)."""
    prefill, first = await run.prefill(run.prep.prompt_ids, run.prep.sampling)
    await run.first_token(first, prefill)
    if not run.finished:
        await run.decode(first, prefill)


def _admit(prep: Prepared, deps: FlowDeps) -> Ticket:
    try:
        return deps.admission.admit(prep.request_id, len(prep.prompt_ids))
    except Overloaded as e:
        raise RouterError(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e)) from None
    except DuplicateRequest as e:
        raise RouterError(grpc.StatusCode.ALREADY_EXISTS, str(e)) from None
