"""RouterError (a status for the client) and how worker failures map to it."""

from __future__ import annotations

import grpc

_PASS_THROUGH = {
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.OUT_OF_RANGE,
    grpc.StatusCode.UNAVAILABLE,
}


class RouterError(Exception):
    """Ends a Generate call with `code` and `message`."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def worker_error(stage: str, replica_id: str, err: grpc.aio.AioRpcError) -> RouterError:
    """UNAVAILABLE, DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED and argument errors keep their code;
    a worker that cancelled on its own is UNAVAILABLE (retryable); anything else is INTERNAL."""
    code = err.code()
    if code not in _PASS_THROUGH:
        code = grpc.StatusCode.UNAVAILABLE if code == grpc.StatusCode.CANCELLED else grpc.StatusCode.INTERNAL
    return RouterError(code, f"{stage} replica {replica_id}: {err.code().name}: {err.details() or ''}".rstrip())


def unavailable(what: str) -> RouterError:
    return RouterError(grpc.StatusCode.UNAVAILABLE, f"no ready {what} replica; retry later")
