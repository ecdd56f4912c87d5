"""Generate `backend_pb2.py` (and its type stub `.pyi`) / `backend_pb2_grpc.py` from `proto/backend.proto`.

Run from the repository root: `python -m backend.proto.generate [OUT_ROOT]`. The stubs are committed inside our
own package (`backend.proto`), so the backend starts without a code-generation step and never imports a
top-level `proto` package (that name belongs to proto-plus); `tests/test_proto.py` regenerates them into a temp
dir and compares. grpcio-tools is needed only here (a test dependency).
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

STUB_DIR = Path(__file__).resolve().parent
PROTO_FILE = STUB_DIR.parents[1] / "proto" / "backend.proto"  # the source of truth, LocalAI's contract
PACKAGE = Path("backend") / "proto"  # where the stubs live, and so how they import each other


def generate(out_root: Path, proto_file: Path = PROTO_FILE) -> list[Path]:
    """Write the stubs under `out_root/backend/proto/` and return their paths."""
    import grpc_tools
    from grpc_tools import protoc

    include = Path(grpc_tools.__file__).parent / "_proto"
    with tempfile.TemporaryDirectory() as tmp:
        # protoc names imports after the file's path under the include root: place the source at our package path.
        staged = Path(tmp) / PACKAGE / "backend.proto"
        staged.parent.mkdir(parents=True)
        shutil.copyfile(proto_file, staged)
        (out_root / PACKAGE).mkdir(parents=True, exist_ok=True)
        args = ["grpc_tools.protoc", f"-I{tmp}", f"-I{include}", f"--python_out={out_root}",
                f"--pyi_out={out_root}", f"--grpc_python_out={out_root}", str(staged)]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {proto_file}")
    return [out_root / PACKAGE / name for name in ("backend_pb2.py", "backend_pb2.pyi", "backend_pb2_grpc.py")]


if __name__ == "__main__":
    root = Path(sys.argv[1]) if len(sys.argv) > 1 else STUB_DIR.parents[1]
    for path in generate(root):
        print(path)
