"""UCX backend through ucxx (asyncio API).

Connection: the puller connects to the source's listener (`host:port`) with peer-failure
handling on, so a dead source fails the pull at once; it caches one connection per source and
sends one request at a time on it. Wire, per pull, on that connection: the puller sends the
PullRequest (an 8-byte little-endian length, then the protobuf bytes); the source answers with a
PullResponse the same way; when ok, the payload follows as one raw message per segment
(payload.py) with tag `request.tag + i`. The puller receives each segment straight into its KV
blocks when they are a contiguous run with all of its heads, else into staging.

Fast path (`UCXConfig.shared_memory`, default on): the puller also sends its UCX worker address
and the source sends the payload over an endpoint to that address created *without* peer-failure
handling, which lets UCX use shared memory (sysv/posix eager, cma single-copy rendezvous) on one
host; with failure handling on, UCX allows only tcp. Receives stay on the connection's endpoint,
so a failure or timeout aborts it and cancels every receive posted into the destination blocks.

ucxx keeps one context per process: every source and puller in a process shares it (one progress
thread per event loop); close() releases only this object's listener and endpoints.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch
import ucxx
from pdserve.v1 import kv_pb2

from kv_transfer.base import (
    MAX_REQUEST_BYTES,
    KVPuller,
    KVSource,
    TransferError,
    TransferState,
    refuse,
)
from kv_transfer.payload import make_landing

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class UCXConfig:
    port: int = 0  # source listener port; 0 = ephemeral (the endpoint string has the real one)
    connect_timeout: float = 5.0  # seconds; also bounded by the pull's timeout
    send_timeout: float = 30.0  # source: a payload not taken within this aborts the connection
    shared_memory: bool = True  # puller: payload over a failure-handling-free endpoint (sm/cma)


def as_buffer(t: torch.Tensor) -> Any:
    """A contiguous tensor as a byte buffer ucxx can send from / receive into (no copy)."""
    flat = t.reshape(-1).view(torch.uint8)
    return flat.numpy() if flat.device.type == "cpu" else flat  # CUDA: __cuda_array_interface__


async def _within(deadline: float | None, aw: Awaitable[T]) -> T:
    if deadline is None:
        return await aw
    return await asyncio.wait_for(aw, max(1e-3, deadline - time.monotonic()))


def _retrieved(task: asyncio.Future[Any]) -> None:
    """Marks an abandoned task's outcome as seen (asyncio logs unseen failures)."""
    if not task.cancelled():
        task.exception()


async def _open_endpoint(host: str, port: int, timeout: float) -> Any:
    """A connection to a UCX listener, or TransferError. ucxx holds a half-made endpoint only in
    its own frames; if they outlived a failure (kept by the exception's traceback) the endpoint
    would be freed later by the garbage collector on whatever thread ran it, which can crash the
    process. So the error is re-raised bare, after the original and its frames are gone."""
    try:
        return await ucxx.create_endpoint(host, port, endpoint_error_handling=True, connect_timeout=timeout)
    except Exception as e:  # noqa: BLE001 - any failure to connect is a TransferError
        reason = f"{type(e).__name__}: {e}"
    raise TransferError(f"cannot connect to KV source {host}:{port}: {reason}")


MAX_ADDRESS_BYTES = 4096  # a UCX worker address is a few hundred bytes
FRAME = 8192  # first message of a control frame; <= ucxx's UCX_RNDV_THRESH keeps it eager


async def send_message(ep: Any, data: bytes) -> None:
    """One control frame: a message of an 8-byte little-endian length and the first
    FRAME - 8 bytes, then (only if longer) a second message with the rest."""
    head = np.frombuffer(len(data).to_bytes(8, "little") + data[: FRAME - 8], dtype=np.uint8)
    sends = [ep.send(head)]
    if len(data) > FRAME - 8:
        sends.append(ep.send(np.frombuffer(data[FRAME - 8 :], dtype=np.uint8)))
    await asyncio.gather(*sends)


async def recv_message(ep: Any, limit: int) -> bytes | None:
    """Receives one control frame; None when it announces more than limit bytes (rest unread)."""
    head = np.empty(FRAME, dtype=np.uint8)
    await ep.recv(head)
    n = int.from_bytes(head[:8].tobytes(), "little")
    if n > limit:
        return None
    if n <= FRAME - 8:
        return head[8 : 8 + n].tobytes()
    rest = np.empty(n - (FRAME - 8), dtype=np.uint8)
    await ep.recv(rest)
    return head[8:].tobytes() + rest.tobytes()


class UCXSource(KVSource):
    def __init__(
        self, kv: torch.Tensor, rank: int, tp_size: int, num_kv_heads: int, config: UCXConfig | None = None
    ) -> None:
        super().__init__(kv, rank, tp_size, num_kv_heads)
        self.config = config or UCXConfig()
        self._listener: Any = None
        self._clients: set[Any] = set()  # control endpoints being served
        self._data_eps: dict[bytes, Any] = {}  # puller worker address -> endpoint

    async def start(self, host: str) -> str:
        self._listener = ucxx.create_listener(self._serve, port=self.config.port)
        return f"{host}:{self._listener.port}"

    async def close(self) -> None:
        listener, self._listener = self._listener, None  # stops every _serve loop
        for ep in [*self._clients, *self._data_eps.values()]:
            ep.abort()  # cancels their pending receives
        self._data_eps.clear()
        deadline = time.monotonic() + 1.0
        while self._clients and time.monotonic() < deadline:
            await asyncio.sleep(0.01)  # let the handlers return before the listener goes
        if listener is not None:
            listener.close()
        with self._lock:
            self._leases.clear()

    async def _serve(self, ep: Any) -> None:
        """One decode connection: answer its requests in order until it closes or misbehaves."""
        self._clients.add(ep)
        try:
            while self._listener is not None:
                if not await self._serve_one(ep):
                    break
        except Exception:  # noqa: BLE001 - peer gone or timed out: drop this connection only
            pass
        finally:
            self._clients.discard(ep)
            ep.abort()

    async def _serve_one(self, ep: Any) -> bool:
        try:
            data = await recv_message(ep, MAX_REQUEST_BYTES)
        except ucxx.exceptions.UCXMessageTruncatedError:
            data = None
        if data is None:  # oversized: refuse, then drop the connection (the rest is unread)
            await send_message(ep, refuse("request too large").response.SerializeToString())
            return False
        await self.wait_ready(data, self.config.send_timeout)
        answer = self.answer(data)
        target = ep
        if answer.response.ok and answer.request is not None and answer.request.reply_address:
            try:
                target = await self._data_ep(answer.request.reply_address)
            except Exception as e:  # noqa: BLE001 - the peer's address is bad, not the source
                answer = refuse(f"bad reply_address: {type(e).__name__}")
        reply = send_message(ep, answer.response.SerializeToString())
        if not answer.response.ok or answer.request is None:
            await reply
            return True
        req = answer.request
        sends = [
            target.send(as_buffer(t), tag=(req.tag + i) % 2**64, force_tag=True)
            for i, t in enumerate(answer.tensors)
        ]
        try:
            await asyncio.wait_for(asyncio.gather(reply, *sends), self.config.send_timeout)
        except asyncio.TimeoutError:
            # The puller gave up and cancelled its receives: abandon these sends (and their staging
            # buffers) but keep the data endpoint, which that puller's other pulls share.
            raise
        except BaseException:
            self._drop_data_ep(req.reply_address)
            raise
        answer.sent()
        return True

    async def _data_ep(self, address: bytes) -> Any:
        ep = self._data_eps.get(address)
        if ep is None:
            own = ucxx.get_worker_address().tobytes()
            # UCX asserts (aborts the process) on an unknown address version: check it first.
            if not 0 < len(address) <= MAX_ADDRESS_BYTES or address[0] & 0x0F != own[0] & 0x0F:
                raise ValueError("not a UCX worker address of this UCX version")
            ucx_address = ucxx.get_ucx_address_from_buffer(address)
            ep = await ucxx.create_endpoint_from_worker_address(ucx_address, endpoint_error_handling=False)
            self._data_eps[address] = ep
        return ep

    def _drop_data_ep(self, address: bytes) -> None:
        ep = self._data_eps.pop(address, None)
        if ep is not None:
            ep.abort()


class UCXPuller(KVPuller):
    def __init__(
        self, kv: torch.Tensor, rank: int, tp_size: int, num_kv_heads: int, config: UCXConfig | None = None
    ) -> None:
        super().__init__(kv, rank, tp_size, num_kv_heads)
        self.config = config or UCXConfig()
        self._eps: dict[str, Any] = {}  # source endpoint -> control endpoint
        self._locks: dict[str, asyncio.Lock] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._address: bytes | None = None  # this process's UCX worker address
        self._connecting: set[asyncio.Future[Any]] = set()  # connections given up on, still being made

    async def close(self) -> None:
        for endpoint in list(self._eps):
            self._drop(endpoint)
        self._locks.clear()
        if self._connecting:  # let abandoned connections end (and close) on this loop
            await asyncio.wait(set(self._connecting), timeout=self.config.connect_timeout + 1.0)

    async def _pull_shard(
        self,
        endpoint: str,
        request: kv_pb2.PullRequest,
        dst_block_ids: list[int],
        dst_heads: tuple[int, int],
        deadline: float,
    ) -> kv_pb2.PullResponse:
        self._bind_loop()
        async with self._locks.setdefault(endpoint, asyncio.Lock()):
            self._set_state(request.request_id, TransferState.CONNECTING)
            ep = await self._connect(endpoint, deadline)
            try:
                return await self._exchange(ep, endpoint, request, dst_block_ids, dst_heads, deadline)
            except BaseException:
                self._drop(endpoint)  # cancels receives posted into kv; the next pull reconnects
                raise

    async def _exchange(
        self,
        ep: Any,
        endpoint: str,
        request: kv_pb2.PullRequest,
        dst_block_ids: list[int],
        dst_heads: tuple[int, int],
        deadline: float,
    ) -> None:
        """Posts the response and payload receives, then sends the request: one round trip.
        On any failure the caller aborts ep, which cancels the receives posted into kv."""
        request.tag = secrets.randbits(63)
        if self.config.shared_memory:
            request.reply_address = self._worker_address()
        landing = make_landing(self.kv, dst_block_ids, list(request.segments), dst_heads, self.pool)
        reply = asyncio.ensure_future(recv_message(ep, MAX_REQUEST_BYTES))
        payload = asyncio.ensure_future(
            asyncio.gather(
                *(
                    ep.recv(as_buffer(buf), tag=(request.tag + i) % 2**64, force_tag=True)
                    for i, buf in enumerate(landing.buffers)
                )
            )
        )
        try:
            await _within(deadline, send_message(ep, request.SerializeToString()))
            response = kv_pb2.PullResponse.FromString(await _within(deadline, reply) or b"")
            if not response.ok:
                raise TransferError(f"source {endpoint} refused: {response.error}")
            if landing.nbytes != response.payload_bytes:
                raise TransferError(f"payload {response.payload_bytes} B from {endpoint}, expected {landing.nbytes} B")
            self._set_state(request.request_id, TransferState.TRANSFERRING)
            await _within(deadline, payload)
        finally:
            for task in (reply, payload):
                task.cancel()  # no-op when done; the caller's abort cancels the UCX requests
                task.add_done_callback(_retrieved)
        landing.finish()
        return response

    def _worker_address(self) -> bytes:
        if self._address is None:
            self._address = ucxx.get_worker_address().tobytes()
        return self._address

    async def _connect(self, endpoint: str, deadline: float) -> Any:
        ep = self._eps.get(endpoint)
        if ep is not None and not ep.closed:
            return ep
        host, _, port = endpoint.rpartition(":")
        timeout = min(self.config.connect_timeout, max(1e-3, deadline - time.monotonic()))
        # Never cancelled half-way (see _open_endpoint): a connection given up on runs to its end
        # and is closed then.
        making = asyncio.ensure_future(_open_endpoint(host, int(port), timeout))
        try:
            ep = await asyncio.wait_for(asyncio.shield(making), timeout + 1.0)
        except BaseException as e:
            self._connecting.add(making)
            making.add_done_callback(self._discard_connection)
            if isinstance(e, TransferError) or not isinstance(e, Exception):
                raise
            raise TransferError(f"cannot connect to KV source {endpoint}: {type(e).__name__}") from None
        self._eps[endpoint] = ep
        return ep

    def _discard_connection(self, making: asyncio.Future[Any]) -> None:
        """Closes a connection nobody waits for any more."""
        self._connecting.discard(making)
        if not making.cancelled() and making.exception() is None:
            making.result().abort()

    def _drop(self, endpoint: str) -> None:
        ep = self._eps.pop(endpoint, None)
        if ep is not None:
            ep.abort()

    def _bind_loop(self) -> None:
        """Endpoints belong to the loop that made them: a new loop starts from scratch."""
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            for endpoint in list(self._eps):
                self._drop(endpoint)
            self._locks.clear()
            self._loop = loop
