"""Generate the Python stubs of every proto/pdserve/v1/*.proto (run: python proto/generate.py).

The generated modules are committed (so a plain install needs no protoc); tests/test_proto_drift.py
regenerates into a temporary folder and fails when they differ from the committed ones.
"""

from __future__ import annotations

import sys
from pathlib import Path

from grpc_tools import protoc

PROTO_ROOT = Path(__file__).resolve().parent
PROTO_DIR = PROTO_ROOT / "pdserve" / "v1"


def proto_files() -> list[Path]:
    return sorted(PROTO_DIR.glob("*.proto"))


def generate(out_dir: Path) -> None:
    """Writes pdserve/v1/*_pb2.py, *_pb2.pyi and *_pb2_grpc.py under out_dir."""
    include = Path(protoc.__file__).resolve().parent / "_proto"
    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *[str(p.relative_to(PROTO_ROOT)) for p in proto_files()],
    ]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed on " + ", ".join(p.name for p in proto_files()))


if __name__ == "__main__":
    generate(PROTO_ROOT)
    sys.exit(0)
