"""torch.distributed backend: point-to-point send/recv over a two-rank process group per
(source, puller) pair; gloo for CPU KV, NCCL for CUDA KV.

Pair formation (at a puller's first pull from a source): the source's endpoint is a TCPStore it
hosts (`host:port`). The puller connects to it as a client, takes a pair number k with
`store.add("joins", 1)`, and both sides build a process group of size 2 on
`PrefixStore(f"pair/{k}", store)` (source rank 0, puller rank 1); the source's acceptor thread
sees the counter move and serves the pair from its own thread.

Per pull: the puller rings a doorbell key `ring/{k}/{n}` in the store (so an idle source never
blocks inside a collective, which gloo cannot time out and resume), then sends the PullRequest as
uint8 tensors (an int64 length, then the protobuf bytes; tags 0 and 1); the source answers with a
PullResponse the same way and, when ok, one tensor per payload segment (tag 2 + i) received
straight into the puller's blocks when possible (payload.py). Any error or timeout drops the
pair; the next pull forms a new one. Blocking calls run in threads; every wait has a timeout.
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from pdserve.v1 import kv_pb2

from kv_transfer.interfaces import MAX_REQUEST_BYTES, TransferError, TransferState
from kv_transfer.puller import KVPuller, ShardPull
from kv_transfer.source import KVSource, refuse


@dataclass(frozen=True, slots=True)
class TorchDistConfig:
    port: int = 0  # source TCPStore port; 0 = ephemeral (the endpoint string has the real one)
    connect_timeout: float = 10.0  # store connect + process-group rendezvous, seconds
    io_timeout: float = 30.0  # source: one request's send/recv on a formed pair
    poll: float = 0.02  # source: longest pause between polls for new pairs / requests


def _group(store: Any, rank: int, device: torch.device, timeout: float) -> Any:
    """A 2-rank process group on store (no default group, no global state)."""
    if device.type == "cuda":
        opts = dist.ProcessGroupNCCL.Options()
        opts._timeout = timedelta(seconds=timeout)
        return dist.ProcessGroupNCCL(store, rank, 2, opts)
    return dist.ProcessGroupGloo(store, rank, 2, timedelta(seconds=timeout))


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8)  # contiguous bytes, no copy


class _Pair:
    """One end of a (source, puller) process group; tags 0/1: message length/body, 2+i: segments."""

    def __init__(self, pg: Any, peer: int, device: torch.device) -> None:
        self.pg = pg
        self.peer = peer
        self.device = device
        self.requests = 0  # doorbells rung (puller) or answered (source)

    def _wait(self, work: Any, timeout: float) -> None:
        work.wait(timedelta(seconds=max(1e-3, timeout)))

    def send_len(self, n: int, timeout: float) -> None:
        header = torch.tensor([n], dtype=torch.int64, device=self.device)
        self._wait(self.pg.send([header], self.peer, 0), timeout)

    def send_bytes(self, data: bytes, timeout: float) -> None:
        self.send_len(len(data), timeout)
        if data:
            body = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(self.device)
            self._wait(self.pg.send([body], self.peer, 1), timeout)

    def recv_bytes(self, limit: int, timeout: float) -> bytes | None:
        """One message, or None when its announced length exceeds limit (body left unread)."""
        header = torch.empty(1, dtype=torch.int64, device=self.device)
        self._wait(self.pg.recv([header], self.peer, 0), timeout)
        n = int(header.item())
        if not 0 <= n <= limit:
            return None
        body = torch.empty(n, dtype=torch.uint8, device=self.device)
        if n:
            self._wait(self.pg.recv([body], self.peer, 1), timeout)
        return body.cpu().numpy().tobytes()

    def send_tensors(self, tensors: list[torch.Tensor], timeout: float) -> None:
        works = [self.pg.send([_flat(t)], self.peer, 2 + i) for i, t in enumerate(tensors)]
        for w in works:
            self._wait(w, timeout)

    def recv_tensors(self, buffers: list[torch.Tensor], deadline: float) -> None:
        works = [self.pg.recv([_flat(b)], self.peer, 2 + i) for i, b in enumerate(buffers)]
        for w in works:
            self._wait(w, deadline - time.monotonic())


class TorchDistSource(KVSource):
    def __init__(
        self, kv: torch.Tensor, rank: int, tp_size: int, num_kv_heads: int, config: TorchDistConfig | None = None
    ) -> None:
        super().__init__(kv, rank, tp_size, num_kv_heads)
        self.config = config or TorchDistConfig()
        self._store: Any = None
        self._address = ("", 0)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    async def start(self, host: str) -> str:
        self._store = dist.TCPStore(host, self.config.port, is_master=True, wait_for_workers=False)
        self._address = (host, self._store.port)
        self._spawn(self._accept)
        return f"{host}:{self._store.port}"

    async def close(self) -> None:
        self._stop.set()
        threads, self._threads = self._threads, []
        for thread in threads:
            await asyncio.to_thread(thread.join, 5.0)
        self._store = None
        self.drop_leases()

    def _spawn(self, target: Any, *args: Any) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True, name="kv-source")
        self._threads.append(thread)
        thread.start()

    def _client(self) -> Any:
        host, port = self._address
        timeout = timedelta(seconds=self.config.connect_timeout)
        return dist.TCPStore(host, port, is_master=False, timeout=timeout)

    def _accept(self) -> None:
        store, accepted = self._client(), 0
        while not self._stop.wait(self.config.poll):
            for k in range(accepted + 1, store.add("joins", 0) + 1):
                self._spawn(self._serve, k)
                accepted = k

    def _serve(self, k: int) -> None:
        """Serves pair k until its puller says bye, misbehaves or dies, or the source closes."""
        try:
            store = self._client()
            pg = _group(dist.PrefixStore(f"pair/{k}", store), 0, self.kv.device, self.config.connect_timeout)
            pair = _Pair(pg, 1, self.kv.device)
            while self._doorbell(store, f"ring/{k}/{pair.requests + 1}"):
                pair.requests += 1
                if not self._serve_one(pair):
                    break
        except Exception:  # noqa: BLE001 - a failed pair ends; the source keeps serving others
            pass

    def _doorbell(self, store: Any, key: str) -> bool:
        """Waits for the puller's next request; False on bye or source close. Polls with
        `check` (a timed-out `wait` would log a warning each time), backing off to `poll`."""
        pause = 1e-4
        while not store.check([key]):
            if self._stop.wait(pause):
                return False
            pause = min(2 * pause, self.config.poll)
        value = store.get(key)
        store.delete_key(key)
        return bool(value == b"go")

    def _serve_one(self, pair: _Pair) -> bool:
        timeout = self.config.io_timeout
        data = pair.recv_bytes(MAX_REQUEST_BYTES, timeout)
        if data is None:
            pair.send_bytes(refuse("request too large").response.SerializeToString(), timeout)
            return False
        self.wait_ready_blocking(data, timeout)
        answer = self.answer(data)
        pair.send_bytes(answer.response.SerializeToString(), timeout)
        if answer.response.ok:
            pair.send_tensors(answer.tensors, timeout)
            answer.sent()
        return True


@dataclass(slots=True)
class _Link:
    store: Any
    key: int  # pair number k
    pair: _Pair
    lock: threading.Lock


class TorchDistPuller(KVPuller):
    def __init__(
        self, kv: torch.Tensor, rank: int, tp_size: int, num_kv_heads: int, config: TorchDistConfig | None = None
    ) -> None:
        super().__init__(kv, rank, tp_size, num_kv_heads)
        self.config = config or TorchDistConfig()
        self._links: dict[str, _Link] = {}
        self._links_lock = threading.Lock()

    async def close(self) -> None:
        with self._links_lock:
            links, self._links = list(self._links.values()), {}
        for link in links:
            await asyncio.to_thread(self._bye, link)

    async def _pull_shard(self, pull: ShardPull) -> kv_pb2.PullResponse:
        return await asyncio.to_thread(self._pull_blocking, pull)

    def _pull_blocking(self, pull: ShardPull) -> kv_pb2.PullResponse:
        endpoint, request, deadline = pull.endpoint, pull.request, pull.deadline
        self._set_state(request.request_id, TransferState.CONNECTING)
        link = self.link(endpoint, deadline)
        with link.lock:
            try:
                response = self.exchange(link, request.SerializeToString(), deadline)
                if not response.ok:
                    raise TransferError(f"source {endpoint} refused: {response.error}")
                self._set_state(request.request_id, TransferState.TRANSFERRING)
                landing = self._landing(pull)
                landing.expect(response.payload_bytes, endpoint)
                link.pair.recv_tensors(landing.buffers, deadline)
                landing.finish()
                return response
            except TransferError as e:
                if "refused" not in str(e):
                    self._drop(endpoint, link)
                raise
            except Exception as e:
                self._drop(endpoint, link)
                raise TransferError(f"pull from {endpoint} failed: {type(e).__name__}: {e}") from e

    def exchange(self, link: _Link, data: bytes, deadline: float) -> kv_pb2.PullResponse:
        """Rings the doorbell, sends one serialized PullRequest, returns the PullResponse."""
        link.pair.requests += 1
        link.store.set(f"ring/{link.key}/{link.pair.requests}", "go")
        link.pair.send_bytes(data, deadline - time.monotonic())
        answer = link.pair.recv_bytes(MAX_REQUEST_BYTES, deadline - time.monotonic())
        return kv_pb2.PullResponse.FromString(answer or b"")

    def link(self, endpoint: str, deadline: float) -> _Link:
        """The cached pair with the source at endpoint, formed on first use (blocking)."""
        with self._links_lock:
            link = self._links.get(endpoint)
        if link is not None:
            return link
        host, _, port = endpoint.rpartition(":")
        timeout = min(self.config.connect_timeout, max(1e-3, deadline - time.monotonic()))
        try:
            store = dist.TCPStore(host, int(port), is_master=False, timeout=timedelta(seconds=timeout))
            k = store.add("joins", 1)
            pg = _group(dist.PrefixStore(f"pair/{k}", store), 1, self.kv.device, timeout)
        except Exception as e:
            raise TransferError(f"cannot reach KV source {endpoint}: {type(e).__name__}: {e}") from e
        link = _Link(store, k, _Pair(pg, 0, self.kv.device), threading.Lock())
        with self._links_lock:
            self._links[endpoint] = link
        return link

    def _drop(self, endpoint: str, link: _Link) -> None:
        with self._links_lock:
            if self._links.get(endpoint) is link:
                del self._links[endpoint]
        self._bye(link)  # ends the source's thread for this pair

    def _bye(self, link: _Link) -> None:
        try:
            link.store.set(f"ring/{link.key}/{link.pair.requests + 1}", "bye")
        except Exception:  # noqa: BLE001 - source already gone
            pass
