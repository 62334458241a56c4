"""Where `pdserve generate` / `status` / `bench` find the router, first match wins:

1. `--address HOST:PORT`
2. the `PDSERVE_ADDRESS` environment variable
3. the address a running `pdserve up` on this machine recorded (the newest one, when several run)
4. `127.0.0.1:50051`

`pdserve up` records its router's address in `<state dir>/up-<pid>.json` (JSON: address, pid,
config, started) once it is SERVING, and removes the file when it stops. A file whose process is gone
(a killed `pdserve up`) is ignored and removed. The state dir is `$PDSERVE_STATE_DIR`, else
`$XDG_RUNTIME_DIR/pdserve`, else `~/.cache/pdserve`.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

DEFAULT_ADDRESS = "127.0.0.1:50051"
ENV_ADDRESS = "PDSERVE_ADDRESS"
ENV_STATE_DIR = "PDSERVE_STATE_DIR"
_WILDCARD_HOSTS = {"0.0.0.0": "127.0.0.1", "::": "::1", "[::]": "[::1]", "": "127.0.0.1"}


@dataclass(frozen=True, slots=True)
class RouterAddress:
    address: str
    source: str  # how it was found, for messages: "--address", "PDSERVE_ADDRESS", ...


def state_dir() -> Path:
    if explicit := os.environ.get(ENV_STATE_DIR):
        return Path(explicit)
    if runtime := os.environ.get("XDG_RUNTIME_DIR"):
        return Path(runtime) / "pdserve"
    return Path.home() / ".cache" / "pdserve"


def connectable(address: str) -> str:
    """A listening address as a client on this machine dials it (0.0.0.0:P -> 127.0.0.1:P)."""
    host, _, port = address.rpartition(":")
    return f"{_WILDCARD_HOSTS.get(host, host)}:{port}"


def record(address: str, config: str | None) -> Path:
    """Called by `pdserve up` once SERVING; returns the file to pass to `forget`."""
    folder = state_dir()
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = folder / f"up-{os.getpid()}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"address": connectable(address), "pid": os.getpid(),
                               "config": config or "defaults", "started": time.time()}))
    tmp.replace(path)
    return path


def forget(path: Path) -> None:
    path.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def recorded() -> list[dict[str, object]]:
    """The live records, newest first; stale files (process gone, unreadable) are removed."""
    out: list[dict[str, object]] = []
    for path in state_dir().glob("up-*.json"):
        try:
            entry = json.loads(path.read_text())
            alive = isinstance(entry, dict) and _alive(int(entry["pid"])) and bool(entry["address"])
        except (OSError, ValueError, KeyError, TypeError):
            alive = False
        if alive:
            out.append(entry)
        else:
            path.unlink(missing_ok=True)
    return sorted(out, key=lambda e: float(e.get("started", 0.0)), reverse=True)  # type: ignore[arg-type]


def resolve(flag: str | None) -> RouterAddress:
    """The router to talk to, by the precedence in this module's docstring."""
    if flag:
        return RouterAddress(flag, "--address")
    if env := os.environ.get(ENV_ADDRESS):
        return RouterAddress(env, ENV_ADDRESS)
    if live := recorded():
        return RouterAddress(str(live[0]["address"]), f"recorded by `pdserve up`, pid {live[0]['pid']}")
    return RouterAddress(DEFAULT_ADDRESS, "the default: no running `pdserve up` recorded one")


def unreachable(target: RouterAddress) -> str:
    """The one line the CLI prints when no router answers at `target`."""
    return (f"pdserve: no router answers at {target.address} ({target.source}); start one with "
            f"`pdserve up`, or point elsewhere with --address HOST:PORT or {ENV_ADDRESS}=HOST:PORT")
