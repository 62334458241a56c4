"""API keys and TLS for the public port (the internal Registry port stays plaintext: keep
`internal_host` on a private network)."""

from __future__ import annotations

import hmac
from collections.abc import Sequence
from pathlib import Path

import grpc

from router.config import RouterConfig

AUTH_HEADER = "authorization"


def _read(path: str) -> bytes:
    return Path(path).read_bytes()


def server_credentials(cfg: RouterConfig) -> grpc.ServerCredentials | None:
    """TLS credentials from the config (mutual TLS when tls_client_ca is set); None = plaintext."""
    if cfg.tls_cert is None or cfg.tls_key is None:
        return None
    client_ca = _read(cfg.tls_client_ca) if cfg.tls_client_ca else None
    return grpc.ssl_server_credentials(
        [(_read(cfg.tls_key), _read(cfg.tls_cert))],
        root_certificates=client_ca,
        require_client_auth=client_ca is not None,
    )


def authorized(metadata: Sequence[tuple[str, str | bytes]] | None, api_keys: Sequence[str]) -> bool:
    """True when no keys are configured or `authorization: Bearer <key>` holds one of them."""
    if not api_keys:
        return True
    for name, value in metadata or ():
        if name.lower() != AUTH_HEADER:
            continue
        text = value.decode() if isinstance(value, bytes) else value
        scheme, _, key = text.partition(" ")
        if scheme.lower() == "bearer" and any(hmac.compare_digest(key.strip(), k) for k in api_keys):
            return True
    return False


def client_channel(address: str, root_ca: str | None = None, client_cert: str | None = None,
                   client_key: str | None = None) -> grpc.Channel:
    """A blocking channel: TLS when root_ca is given (mutual TLS with client_cert + client_key)."""
    if root_ca is None:
        return grpc.insecure_channel(address)
    creds = grpc.ssl_channel_credentials(
        root_certificates=_read(root_ca),
        private_key=_read(client_key) if client_key else None,
        certificate_chain=_read(client_cert) if client_cert else None,
    )
    return grpc.secure_channel(address, creds)


def auth_metadata(api_key: str | None) -> tuple[tuple[str, str], ...] | None:
    return ((AUTH_HEADER, f"Bearer {api_key}"),) if api_key else None
