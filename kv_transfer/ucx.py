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

Same-host read (`UCXConfig.same_host_read`, default on; docs/kv_transfer.md): a source whose
pool is a memfd answers a puller on its host with where to map it; the puller copies the blocks
itself and then asks whether they stayed leased. Only control frames cross UCX.

ucxx keeps one context per process, and pdserve one event loop for it (ucx_loop.py): every source
and puller runs its UCX work there, whichever loop calls it; that loop progresses UCX when the
worker's epoll descriptor wakes it, so an awaited request sleeps in the kernel. close() releases only this object's listener and
endpoints.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import mmap
import os
import secrets
import time
import warnings
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch
import ucxx
from pdserve.v1 import kv_pb2

from kv_transfer import ucx_loop
from kv_transfer.host import HOST_ID
from kv_transfer.interfaces import MAX_REQUEST_BYTES, TransferError, TransferState
from kv_transfer.puller import KVPuller, ShardPull
from kv_transfer.source import KVSource, refuse
from kv_transfer.ucx_loop import on_ucx_loop

T = TypeVar("T")
log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class UCXConfig:
    port: int = 0  # source listener port; 0 = ephemeral (the endpoint string has the real one)
    connect_timeout: float = 5.0  # seconds; also bounded by the pull's timeout
    send_timeout: float = 30.0  # source: a payload not taken within this aborts the connection
    shared_memory: bool = True  # puller: payload over a failure-handling-free endpoint (sm/cma)
    same_host_read: bool = True  # puller: copy from a same-host source's mapped pool (no payload)


def as_buffer(t: torch.Tensor) -> Any:
    """A contiguous tensor as a byte buffer ucxx can send from / receive into (no copy)."""
    flat = t.reshape(-1).view(torch.uint8)
    return flat.numpy() if flat.device.type == "cpu" else flat  # CUDA: __cuda_array_interface__


async def _within(deadline: float | None, aw: Awaitable[T]) -> T:
    if deadline is None:
        return await aw
    return await asyncio.wait_for(aw, max(1e-3, deadline - time.monotonic()))


def copy_blocks(src: torch.Tensor, dst: torch.Tensor, src_ids: list[int], dst_ids: list[int],
                src_heads: tuple[int, int], dst_heads: tuple[int, int]) -> None:
    """dst[dst_ids[i], :, :, dst_heads] = src[src_ids[i], :, :, src_heads], one copy per run of
    blocks consecutive on both sides."""
    (s0, s1), (d0, d1) = src_heads, dst_heads
    i = 0
    while i < len(src_ids):
        j = i + 1
        while j < len(src_ids) and src_ids[j] == src_ids[j - 1] + 1 and dst_ids[j] == dst_ids[j - 1] + 1:
            j += 1
        a, b, n = src_ids[i], dst_ids[i], j - i
        dst[b : b + n, :, :, d0:d1].copy_(src[a : a + n, :, :, s0:s1])
        i = j


def map_pool(pool: kv_pb2.LocalPool, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Maps another process's KV pool read-only, with its page tables filled at once (a first
    touch per page inside a pull would cost more than the copy)."""
    nbytes = math.prod(shape) * dtype.itemsize
    fd = os.open(f"/proc/{pool.pid}/fd/{pool.fd}", os.O_RDONLY | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if st.st_ino != pool.inode or st.st_size != nbytes:
            raise TransferError(f"/proc/{pool.pid}/fd/{pool.fd} is not the {nbytes}-byte pool announced")
        flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
        mapping = mmap.mmap(fd, nbytes, flags=flags, prot=mmap.PROT_READ)
    finally:
        os.close(fd)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # read-only buffer: this tensor is only ever read
        return torch.frombuffer(mapping, dtype=torch.uint8).view(dtype).view(shape)


async def _uncancelled(fut: asyncio.Future[Any]) -> None:
    """Awaits fut (work writing into our blocks); cancelled meanwhile, still lets it end before
    the cancellation goes on, so the blocks are not freed under it."""
    try:
        await asyncio.shield(fut)
    except asyncio.CancelledError:
        while not fut.done():
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait([fut])
        raise


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
        _drop_frames(e)  # the exception outlives this block in the future ucxx completed with it
    raise TransferError(f"cannot connect to KV source {host}:{port}: {reason}")


def _drop_frames(error: BaseException | None) -> None:
    """Detaches the tracebacks (and so the frames) of error and the errors it chains to."""
    while error is not None:
        error.__traceback__ = None
        error = error.__context__


async def _request(op: Awaitable[T]) -> T:
    """Awaits one ucxx send or receive. A failed request's exception holds, through its traceback,
    the frames that completed it and so the ucxx request and its endpoint; kept by whoever keeps
    the exception, they would outlive the connection's close. So a failure is raised as a fresh
    exception of the same type, the original stripped of frames."""
    try:
        return await op
    except Exception as e:  # noqa: BLE001 - re-raised as a copy
        _drop_frames(e)
        try:
            fresh: Exception = type(e)(*e.args)
        except Exception:  # noqa: BLE001 - a type that cannot be rebuilt from its args
            fresh = TransferError(f"{type(e).__name__}: {e}")
        raise fresh from None


INLINE_COPY_BYTES = 16 << 20  # same-host reads up to this size (~1 ms) copy on the event loop's thread
MAX_ADDRESS_BYTES = 4096  # a UCX worker address is a few hundred bytes
FRAME = 8192  # first message of a control frame; <= ucxx's UCX_RNDV_THRESH keeps it eager


async def send_message(ep: Any, data: bytes) -> None:
    """One control frame: a message of an 8-byte little-endian length and the first
    FRAME - 8 bytes, then (only if longer) a second message with the rest."""
    head = np.frombuffer(len(data).to_bytes(8, "little") + data[: FRAME - 8], dtype=np.uint8)
    sends = [_request(ucx_loop.send(ep, head))]
    if len(data) > FRAME - 8:
        sends.append(_request(ucx_loop.send(ep, np.frombuffer(data[FRAME - 8 :], dtype=np.uint8))))
    await asyncio.gather(*sends)


async def recv_message(ep: Any, limit: int, idle: bool = False) -> bytes | None:
    """Receives one control frame; None when it announces more than limit bytes (rest unread).
    idle: the frame is a peer's next request, which may never come."""
    head = np.empty(FRAME, dtype=np.uint8)
    await _request(ucx_loop.recv(ep, head, idle=idle))
    n = int.from_bytes(head[:8].tobytes(), "little")
    if n > limit:
        return None
    if n <= FRAME - 8:
        return head[8 : 8 + n].tobytes()
    rest = np.empty(n - (FRAME - 8), dtype=np.uint8)
    await _request(ucx_loop.recv(ep, rest))
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
        return await on_ucx_loop(self._start(host))

    async def close(self) -> None:
        await on_ucx_loop(self._close())

    async def _start(self, host: str) -> str:
        self._listener = ucxx.create_listener(self._serve, port=self.config.port)
        return f"{host}:{self._listener.port}"

    async def _close(self) -> None:
        listener, self._listener = self._listener, None  # stops every _serve loop
        for ep in [*self._clients, *self._data_eps.values()]:
            ep.abort()  # cancels their pending receives
        self._data_eps.clear()
        deadline = time.monotonic() + 1.0
        while self._clients and time.monotonic() < deadline:
            await asyncio.sleep(0.01)  # let the handlers return before the listener goes
        if listener is not None:
            listener.close()
        self.drop_leases()

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
            data = await recv_message(ep, MAX_REQUEST_BYTES, idle=True)
        except ucxx.exceptions.UCXMessageTruncatedError:
            data = None
        if data is None:  # oversized: refuse, then drop the connection (the rest is unread)
            await send_message(ep, refuse("request too large").response.SerializeToString())
            return False
        await self.wait_ready(data, self.config.send_timeout)
        answer = self.answer(data)
        if answer.response.HasField("local") and answer.request is not None:
            await self._local_read(ep, answer.response, answer.request)
            return True
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
            _request(ucx_loop.send(target, as_buffer(t), (req.tag + i) % 2**64))
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

    async def _local_read(self, ep: Any, response: kv_pb2.PullResponse, request: kv_pb2.PullRequest) -> None:
        """Same-host read: the puller copies from the pool, says when it is done, and learns
        whether the blocks stayed leased meanwhile."""
        await send_message(ep, response.SerializeToString())
        data = await asyncio.wait_for(recv_message(ep, MAX_REQUEST_BYTES), self.config.send_timeout)
        done = kv_pb2.LocalReadDone.FromString(data or b"")
        if done.copied and not self.still_leased(request):
            final = refuse(f"the lease of {request.request_id!r} ended during the same-host read").response
        else:
            final = kv_pb2.PullResponse(ok=True)
        await send_message(ep, final.SerializeToString())

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
        self._address: bytes | None = None  # this process's UCX worker address
        self._connecting: set[asyncio.Future[Any]] = set()  # connections given up on, still being made
        self._pools: dict[str, tuple[tuple[int, int, int], torch.Tensor]] = {}  # same-host reads: mapped pools
        self._not_local: set[str] = set()  # sources whose pool this process could not map

    async def close(self) -> None:
        await on_ucx_loop(self._close())

    async def _close(self) -> None:
        for endpoint in list(self._eps):
            self._drop(endpoint)
        self._locks.clear()
        if self._connecting:  # let abandoned connections end (and close) on this loop
            await asyncio.wait(set(self._connecting), timeout=self.config.connect_timeout + 1.0)

    async def _pull_shard(self, pull: ShardPull) -> kv_pb2.PullResponse:
        return await on_ucx_loop(self._pull_on_loop(pull))

    async def _pull_on_loop(self, pull: ShardPull) -> kv_pb2.PullResponse:
        async with self._locks.setdefault(pull.endpoint, asyncio.Lock()):
            self._set_state(pull.request.request_id, TransferState.CONNECTING)
            ep = await self._connect(pull.endpoint, pull.deadline)
            try:
                return await self._exchange(ep, pull)
            except BaseException:
                self._drop(pull.endpoint)  # cancels receives posted into kv; the next pull reconnects
                raise

    async def _exchange(self, ep: Any, pull: ShardPull) -> kv_pb2.PullResponse:
        """Posts the response and payload receives, then sends the request: one round trip.
        Asking for a same-host read, it posts the payload receives only if the source sends the
        payload after all (UCX holds what arrives first). On any failure the caller aborts ep,
        which cancels the receives posted into kv."""
        request, deadline = pull.request, pull.deadline
        request.tag = secrets.randbits(63)
        if self.config.shared_memory:
            request.reply_address = self._worker_address()
        if self.config.same_host_read and HOST_ID and pull.endpoint not in self._not_local:
            request.local_host = HOST_ID
        landing = None if request.local_host else self._landing(pull)
        reply = asyncio.ensure_future(recv_message(ep, MAX_REQUEST_BYTES))
        payload = None if landing is None else self._receive(ep, request, landing)
        try:
            await _within(deadline, send_message(ep, request.SerializeToString()))
            response = kv_pb2.PullResponse.FromString(await _within(deadline, reply) or b"")
            if not response.ok:
                raise TransferError(f"source {pull.endpoint} refused: {response.error}")
            self._set_state(request.request_id, TransferState.TRANSFERRING)
            if response.HasField("local"):
                return await self._read_local(ep, response, pull)
            if landing is None:
                landing = self._landing(pull)
                payload = self._receive(ep, request, landing)
            landing.expect(response.payload_bytes, pull.endpoint)
            assert payload is not None
            await _within(deadline, payload)
        finally:
            for task in (reply, payload):
                if task is not None:
                    task.cancel()  # no-op when done; the caller's abort cancels the UCX requests
                    task.add_done_callback(_retrieved)
        landing.finish()
        return response

    @staticmethod
    def _receive(ep: Any, request: kv_pb2.PullRequest, landing: Any) -> asyncio.Future[Any]:
        """Posts one receive per payload segment, straight into the landing buffers."""
        return asyncio.ensure_future(
            asyncio.gather(
                *(
                    _request(ucx_loop.recv(ep, as_buffer(buf), (request.tag + i) % 2**64))
                    for i, buf in enumerate(landing.buffers)
                )
            )
        )

    async def _read_local(self, ep: Any, response: kv_pb2.PullResponse, pull: ShardPull) -> kv_pb2.PullResponse:
        """Same-host read: copies the blocks out of the source's mapped pool, then asks the source
        whether they stayed leased. A pool this process cannot map (another user, a container's
        /proc) is reported to the source and the pull is made again with the payload sent."""
        endpoint, request, deadline = pull.endpoint, pull.request, pull.deadline
        try:
            src = await self._mapped_pool(endpoint, response.local)
        except (OSError, ValueError, TransferError) as e:
            self._not_local.add(endpoint)
            await _within(deadline, send_message(ep, kv_pb2.LocalReadDone(copied=False).SerializeToString()))
            await _within(deadline, recv_message(ep, MAX_REQUEST_BYTES))
            request.local_host = ""
            log.info("KV source %s: no same-host read (%s: %s); it sends the payload", endpoint, type(e).__name__, e)
            return await self._exchange(ep, pull)
        src_ids, dst_ids, dst_heads = list(response.local_block_ids), pull.dst_block_ids, pull.dst_heads
        if len(src_ids) != len(dst_ids) or not all(0 <= b < src.shape[0] for b in src_ids):
            raise TransferError(f"source {endpoint}: bad block ids for a same-host read")
        copy = functools.partial(copy_blocks, src, self.kv, src_ids, dst_ids,
                                 (request.head_start, request.head_end), dst_heads)
        nbytes = len(dst_ids) * self.kv[0, :, :, dst_heads[0] : dst_heads[1]].nbytes
        if nbytes <= INLINE_COPY_BYTES:
            copy()  # a millisecond at most: cheaper than a hop to a thread
        else:
            await _uncancelled(asyncio.get_running_loop().run_in_executor(None, copy))
        await _within(deadline, send_message(ep, kv_pb2.LocalReadDone(copied=True).SerializeToString()))
        final = kv_pb2.PullResponse.FromString(await _within(deadline, recv_message(ep, MAX_REQUEST_BYTES)) or b"")
        if not final.ok:
            raise TransferError(f"source {endpoint}: {final.error or 'no answer to the same-host read'}")
        return response

    async def _mapped_pool(self, endpoint: str, pool: kv_pb2.LocalPool) -> torch.Tensor:
        """The source's pool, mapped read-only (kept per source until its connection drops)."""
        key = (pool.pid, pool.fd, pool.inode)
        cached = self._pools.get(endpoint)
        if cached is not None and cached[0] == key:
            return cached[1]
        _, layers, _, _, block, dim = self.kv.shape
        shape = (pool.num_blocks, layers, 2, pool.heads, block, dim)
        src = await asyncio.to_thread(map_pool, pool, shape, self.kv.dtype)  # page tables: ~0.1 s per GiB
        self._pools[endpoint] = (key, src)
        return src

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
        self._pools.pop(endpoint, None)  # a source that comes back may be another process
        ep = self._eps.pop(endpoint, None)
        if ep is not None:
            ep.abort()
