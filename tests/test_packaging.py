"""The wheel of this project (built here, without dependencies or build isolation: nothing is downloaded) holds every
file of our three packages, the gRPC stubs inside `backend`, run.sh executable, the YAML/data files and `py.typed`,
and no top-level `proto` package; installed on its own it imports beside someone else's `proto`."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("backend", "gallery", "quantizer")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Build from a copy: setuptools writes build/ and *.egg-info into the source tree it builds.
    src = tmp_path_factory.mktemp("src")
    for name in (*PACKAGES, "proto"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    out = tmp_path_factory.mktemp("wheel")
    cmd = [sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation", "--no-index", "-q",
           "-w", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    [whl] = out.glob("apexmtp-*.whl")
    return whl


def test_the_version_is_written_once(wheel: Path) -> None:
    import backend

    assert wheel.name.startswith(f"apexmtp-{backend.__version__}-")  # pyproject.toml reads backend.__version__


def _source_files() -> set[str]:
    return {str(p.relative_to(ROOT)) for pkg in PACKAGES for p in (ROOT / pkg).rglob("*")
            if p.is_file() and "__pycache__" not in p.parts}


def test_wheel_holds_every_package_file_and_nothing_else(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        run_sh_mode = z.getinfo("backend/run.sh").external_attr >> 16
        top_level = z.read(next(n for n in names if n.endswith(".dist-info/top_level.txt"))).decode().split()
        entry_points = z.read(next(n for n in names if n.endswith(".dist-info/entry_points.txt"))).decode()
    files = {n for n in names if ".dist-info/" not in n}
    assert files == _source_files()
    assert {"backend/proto/backend_pb2.py", "backend/proto/backend_pb2.pyi", "backend/proto/backend_pb2_grpc.py",
            "gallery/index.yaml",
            "quantizer/recipes.yaml", "quantizer/data/calibration.txt"} <= files
    assert {f"{pkg}/py.typed" for pkg in PACKAGES} <= files
    assert sorted(top_level) == list(PACKAGES) and not any(n.startswith("proto/") for n in names)
    assert run_sh_mode & 0o111, "run.sh must stay executable"
    assert "apexmtp = backend.cli:main" in entry_points


def test_installed_wheel_imports_beside_another_proto_package(wheel: Path, tmp_path: Path) -> None:
    target = tmp_path / "site"
    done = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target",
                           str(target), str(wheel)], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    other = tmp_path / "other" / "proto"
    other.mkdir(parents=True)
    (other / "__init__.py").write_text("OWNER = 'proto-plus'\n")
    code = ("import proto, backend, backend.proto.backend_pb2 as pb; from gallery.catalog import load_catalog; "
            f"assert backend.__file__.startswith({str(target)!r}), backend.__file__; "
            "assert proto.OWNER == 'proto-plus' and pb.PredictOptions; assert load_catalog().entries; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=60,
                         env={"PYTHONPATH": f"{target}:{other.parent}", "PATH": "/usr/bin:/bin"}, check=False)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
