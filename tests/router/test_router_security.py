"""API keys and TLS on the router's public port."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
from pathlib import Path

import grpc
import pytest

from router import client
from tests.fake_workers import FakeDecode, FakePrefill, make_config, start_cluster


def _self_signed(tmp: Path) -> tuple[str, str]:
    """A certificate for 127.0.0.1 (its own CA) and its key, as PEM files."""
    x509 = pytest.importorskip("cryptography.x509")
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pdserve-test")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp / "cert.pem", tmp / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return str(cert_path), str(key_path)


async def _tls_and_keys(cert: str, key: str) -> None:
    cfg = make_config(api_keys=("s3cret",), tls_cert=cert, tls_key=key)
    c = await start_cluster({"p0": FakePrefill()}, {"d0": FakeDecode()}, cfg)
    try:
        good = client.Endpoint(c.router.address, api_key="s3cret", root_ca=cert)
        done = await asyncio.to_thread(client.generate, good, "abc", max_tokens=3)
        assert done.text == "def" and done.finish_reason == "length"
        assert (await asyncio.to_thread(client.get_status, good)).serving
        await asyncio.to_thread(client.wait_healthy, client.Endpoint(c.router.address, root_ca=cert), 5.0)
        for bad in (client.Endpoint(c.router.address, root_ca=cert),
                    client.Endpoint(c.router.address, api_key="wrong", root_ca=cert)):
            with pytest.raises(grpc.RpcError) as info:
                await asyncio.to_thread(client.generate, bad, "abc", max_tokens=3)
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED  # type: ignore[attr-defined]
        with pytest.raises(grpc.RpcError) as info:  # plaintext client on a TLS port
            await asyncio.to_thread(client.get_status, client.Endpoint(c.router.address, api_key="s3cret"), 2.0)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]
    finally:
        await c.close()


def test_api_keys_and_tls(tmp_path: Path) -> None:
    cert, key = _self_signed(tmp_path)
    asyncio.run(asyncio.wait_for(_tls_and_keys(cert, key), 30))


def test_tls_config_must_be_complete() -> None:
    with pytest.raises(ValueError, match="together"):
        make_config(tls_cert="x.pem")
    with pytest.raises(ValueError, match="tls_client_ca"):
        make_config(tls_client_ca="ca.pem")
