"""The committed pdserve.v1 stubs must be exactly what proto/generate.py makes from the .proto files."""

from __future__ import annotations

import importlib.util
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
V1 = REPO / "proto" / "pdserve" / "v1"


def _load_generator():  # proto/ is not a package: load generate.py by path
    spec = importlib.util.spec_from_file_location("pdserve_proto_generate", REPO / "proto" / "generate.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _stubs(folder: Path) -> dict[str, bytes]:
    patterns = ("*_pb2.py", "*_pb2.pyi", "*_pb2_grpc.py")
    return {p.name: p.read_bytes() for pat in patterns for p in folder.glob(pat)}


def test_committed_stubs_match_regenerated(tmp_path: Path) -> None:
    _load_generator().generate(tmp_path)
    fresh = _stubs(tmp_path / "pdserve" / "v1")
    committed = _stubs(V1)
    assert fresh, "protoc generated nothing"
    missing = sorted(set(fresh) - set(committed))
    stale = sorted(set(committed) - set(fresh))
    changed = sorted(n for n in fresh.keys() & committed.keys() if fresh[n] != committed[n])
    assert not (missing or stale or changed), (
        f"generated stubs drifted (run `python proto/generate.py` and commit): "
        f"missing={missing} stale={stale} changed={changed}"
    )


def test_every_proto_has_stubs() -> None:
    for proto in V1.glob("*.proto"):
        assert (V1 / f"{proto.stem}_pb2.py").exists(), proto.name
