"""Generate `backend_pb2.py` / `backend_pb2_grpc.py` from `backend.proto` with grpcio-tools.

Run from anywhere: `python -m proto.generate [OUT_DIR]`. The stubs are committed so the backend starts
without a code-generation step; `tests/test_proto.py` regenerates them into a temp dir and compares.
"""

from __future__ import annotations

import sys
from pathlib import Path

PROTO_DIR = Path(__file__).resolve().parent


def generate(out_root: Path) -> list[Path]:
    """Write the stubs under `out_root/proto/` and return their paths."""
    from grpc_tools import protoc
    import grpc_tools

    include = Path(grpc_tools.__file__).parent / "_proto"
    out_root.mkdir(parents=True, exist_ok=True)
    (out_root / "proto").mkdir(exist_ok=True)
    # Include root is the repository root, so the stubs import each other as `proto.backend_pb2`.
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_DIR.parent}",
        f"-I{include}",
        f"--python_out={out_root}",
        f"--grpc_python_out={out_root}",
        str(PROTO_DIR / "backend.proto"),
    ]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed on proto/backend.proto")
    return [out_root / "proto" / "backend_pb2.py", out_root / "proto" / "backend_pb2_grpc.py"]


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else PROTO_DIR.parent
    for path in generate(target):
        print(path)
