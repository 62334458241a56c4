"""Fault injection on a real cluster (router + Ray Serve pools + UCX), configured from YAML with
mutual TLS and an API key: kill -9 a decode replica mid-stream (migration on / off), kill a prefill
replica before hand-off, and the security checks of the public port.

One cluster for the module: 2 prefill replicas (TP 1) and 2 decode replicas.
"""

from __future__ import annotations

import dataclasses
import datetime
import ipaddress
import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch

from router import client
from router.client import Endpoint
from router.registry import DECODE, PREFILL
from router.request_run import RequestRun
from tests.e2e import RunningCluster, running_cluster, small_config

pytestmark = pytest.mark.usefixtures("ray_session")
API_KEY = "k-e2e"


def _pem_pair(tmp: Path, name: str, cn: str, issuer: tuple[Any, Any] | None, ca: bool) -> tuple[Any, Any]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    issuer_cert, issuer_key = issuer if issuer else (None, key)
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(subject)
               .issuer_name(issuer_cert.subject if issuer_cert else subject).public_key(key.public_key())
               .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), True))
    if not ca:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
    cert = builder.sign(issuer_key, hashes.SHA256())
    (tmp / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp / f"{name}.key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return cert, key


def _pki(tmp: Path) -> dict[str, str]:
    pytest.importorskip("cryptography")
    ca = _pem_pair(tmp, "ca", "pdserve-test-ca", None, True)
    _pem_pair(tmp, "server", "pdserve-router", ca, False)
    _pem_pair(tmp, "client", "pdserve-client", ca, False)
    return {n: str(tmp / n) for n in ("ca.pem", "server.pem", "server.key", "client.pem", "client.key")}


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return _pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def cluster(hf_checkpoint: Callable[[str], Path], pki: dict[str, str]) -> Iterator[RunningCluster]:
    tls = {"cert": pki["server.pem"], "key": pki["server.key"], "client_ca": pki["ca.pem"]}
    cfg = small_config(str(hf_checkpoint("llama")),
                       router={"api_keys": [API_KEY], "tls": tls},
                       prefill={"tensor_parallel_size": 1, "replicas": 2},
                       decode={"replicas": 2},
                       kv_transfer={"lease_seconds": 5})
    with running_cluster(cfg) as cl:
        _wait_pools(cl, 2, 2)
        yield cl


@pytest.fixture(scope="module")
def ep(cluster: RunningCluster, pki: dict[str, str]) -> Endpoint:
    return Endpoint(cluster.address, api_key=API_KEY, root_ca=pki["ca.pem"],
                    client_cert=pki["client.pem"], client_key=pki["client.key"])


def _wait_pools(cl: RunningCluster, prefills: int, decodes: int, within: float = 120.0) -> None:
    registry = cl.cluster.router.registry
    deadline = time.monotonic() + within
    while len(registry.ready(PREFILL)) < prefills or len(registry.ready(DECODE)) < decodes:
        assert time.monotonic() < deadline, "pools never came back"
        time.sleep(0.2)


def pid_listening_on(address: str) -> int:
    """The pid of the process with a TCP socket listening on address's port (the replica's gRPC
    server, as GetStatus reports it): /proc/net/tcp gives the socket inode, /proc/*/fd its owner."""
    port = int(address.rpartition(":")[2])
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "0A":  # 0A = LISTEN
                inodes.add(fields[9])
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            for fd in (proc / "fd").iterdir():
                link = os.readlink(fd)
                if link.startswith("socket:[") and link[8:-1] in inodes:
                    return int(proc.name)
        except OSError:
            continue
    raise LookupError(f"no process listens on {address}")


def _blocks_free(ep: Endpoint, within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while True:
        st = client.get_status(ep)
        replicas = list(st.prefill.replicas) + list(st.decode.replicas)
        if all(r.kv_blocks_free == r.kv_blocks_total and r.kv_blocks_leased == 0 for r in replicas):
            return
        assert time.monotonic() < deadline, f"blocks not free: {st}"
        time.sleep(0.1)


def _prompt(seed: int, n: int = 40) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, 1000, (n,), generator=g).tolist()


def _decode_pids(cl: RunningCluster, within: float = 15.0) -> dict[str, int]:
    """Replica id -> pid of every ready decode replica. A replica killed by an earlier test stays in
    the registry until it misses 3 heartbeats, with nothing listening on its address: wait that out."""
    deadline = time.monotonic() + within
    while True:
        try:
            return {r.replica_id: pid_listening_on(r.address) for r in cl.cluster.router.registry.ready(DECODE)}
        except LookupError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def _kill_decode_mid_stream(cl: RunningCluster, ep: Endpoint, prompt: list[int], max_tokens: int) -> list[int]:
    """Streams, and kill -9s the decode replica serving the request after its first decode message."""
    pids = _decode_pids(cl)
    got: list[int] = []
    killed = False
    for chunk in client.generate_stream(ep, prompt, max_tokens=max_tokens, ignore_eos=True, timeout=60):
        got.extend(chunk.token_ids)
        if not killed and len(got) > 1:
            serving = [r for r in cl.cluster.router.registry.ready(DECODE) if r.open_streams]
            assert len(serving) == 1
            os.kill(pids[serving[0].replica_id], signal.SIGKILL)
            killed = True
    assert killed
    return got


def test_kill_decode_mid_stream_migrates_with_identical_greedy_output(cluster: RunningCluster, ep: Endpoint,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    migrations: list[str] = []
    real = RequestRun._migrate

    async def counted(*args: Any, **kwargs: Any) -> Any:
        migrations.append(args[0].prep.request_id)
        return await real(*args, **kwargs)

    monkeypatch.setattr(RequestRun, "_migrate", counted)
    prompt = _prompt(1)
    expected = list(client.generate(ep, prompt, max_tokens=400, ignore_eos=True, timeout=60).token_ids)
    got = _kill_decode_mid_stream(cluster, ep, prompt, 400)
    if not migrations:
        pytest.skip("decode finished before the kill landed (machine too fast for 400 tokens)")
    assert got == expected and len(migrations) == 1
    _blocks_free(ep)
    _wait_pools(cluster, 2, 2)  # Serve restarts the killed replica


def test_kill_decode_with_migration_off_is_unavailable_within_10s(cluster: RunningCluster, ep: Endpoint) -> None:
    router = cluster.cluster.router
    config = router.deps.config
    object.__setattr__(router.deps, "config", dataclasses.replace(config, migration=False))
    try:
        start = time.monotonic()
        with pytest.raises(grpc.RpcError) as err:
            _kill_decode_mid_stream(cluster, ep, _prompt(2), 400)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]
        assert time.monotonic() - start < 10
    finally:
        object.__setattr__(router.deps, "config", config)
    _blocks_free(ep)
    _wait_pools(cluster, 2, 2)


def test_prefill_replica_killed_before_hand_off_is_retried_invisibly(cluster: RunningCluster, ep: Endpoint) -> None:
    registry = cluster.cluster.router.registry
    victim, other = registry.ready(PREFILL)[:2]
    os.kill(pid_listening_on(victim.address), signal.SIGKILL)
    other.outstanding_prompt_tokens += 100_000  # the router still picks the dead replica first
    try:
        done = client.generate(ep, _prompt(3), max_tokens=8, ignore_eos=True, timeout=60)
    finally:
        other.outstanding_prompt_tokens -= 100_000
    assert len(done.token_ids) == 8 and done.finish_reason == "length"
    _wait_pools(cluster, 2, 2)
    _blocks_free(ep)


def test_api_key_checked_on_every_rpc_and_tls_enforced(cluster: RunningCluster, ep: Endpoint,
                                                        pki: dict[str, str]) -> None:
    assert client.get_status(ep).serving
    for key in (None, "wrong"):
        bad = dataclasses.replace(ep, api_key=key)
        for call in (lambda e: client.generate(e, [1, 2, 3], max_tokens=2, timeout=10),
                     lambda e: client.get_status(e)):
            with pytest.raises(grpc.RpcError) as err:
                call(bad)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED  # type: ignore[attr-defined]
    plaintext = Endpoint(cluster.address, api_key=API_KEY)
    no_cert = Endpoint(cluster.address, api_key=API_KEY, root_ca=pki["ca.pem"])
    for refused in (plaintext, no_cert):
        with pytest.raises(grpc.RpcError) as err:
            client.get_status(refused, timeout=3)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]
    assert len(client.generate(ep, [1, 2, 3], max_tokens=2, timeout=30).token_ids) == 2
