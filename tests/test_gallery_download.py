"""Downloads against a local fake hub (real huggingface_hub client via HF_ENDPOINT): verified, resumable within a
call and across processes, atomic, and refusing traversal."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from fakehub import FakeHub

from backend.errors import ChecksumMismatchError, DownloadError, EntryNotFoundError, UnsafePathError
from gallery.download import fetch
from gallery.resolve import HubFile

REPO = "test/Tiny-APEX-GGUF"
NAME = "Tiny-APEX-I-Balanced.gguf"
DEST = f"llama-cpp/models/{REPO}/{NAME}"
ROOT = Path(__file__).resolve().parent.parent
CHUNK = 64 * 1024


@pytest.fixture()
def payload() -> bytes:
    return os.urandom(4 * 1024 * 1024 + 123)


@pytest.fixture()
def hub(payload: bytes):
    with FakeHub({REPO: {NAME: payload, "other.gguf": b"GGUF" + bytes(1000)}}) as h:
        yield h


@pytest.fixture()
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """huggingface_hub writes 10 MiB chunks; test files are a few MiB, so make its chunks small."""
    import huggingface_hub.constants as hf_constants

    monkeypatch.setattr(hf_constants, "DOWNLOAD_CHUNK_SIZE", CHUNK)


def _fetch(hub: FakeHub, models: Path, **kw) -> object:
    return fetch(HubFile(REPO, NAME), DEST, models_dir=models, endpoint=hub.url, progress=False, **kw)


def _leftovers(models: Path) -> list[str]:
    return sorted(p.name for p in models.rglob("*") if p.is_file())


def test_fetch_verifies_and_lands_atomically(hub: FakeHub, payload: bytes, tmp_path: Path) -> None:
    sha = hashlib.sha256(payload).hexdigest()
    result = _fetch(hub, tmp_path, sha256=sha)
    assert result.path == tmp_path / DEST and result.path.read_bytes() == payload
    assert (result.sha256, result.size, result.reused) == (sha, len(payload), False)
    assert _leftovers(tmp_path) == [NAME]  # no partial, state or lock file left behind
    n_requests = len(hub.log)
    assert _fetch(hub, tmp_path, sha256=sha).reused and len(hub.log) == n_requests  # present: no request at all


def test_hub_sha256_is_used_when_nothing_is_pinned(hub: FakeHub, payload: bytes, tmp_path: Path) -> None:
    assert _fetch(hub, tmp_path).sha256 == hashlib.sha256(payload).hexdigest()


def test_interrupted_transfer_resumes_with_range(hub: FakeHub, payload: bytes, tmp_path: Path,
                                                 small_chunks: None) -> None:
    hub.cut_after[NAME] = 1_000_000
    result = _fetch(hub, tmp_path, sha256=hashlib.sha256(payload).hexdigest())
    assert result.path.read_bytes() == payload
    first, second = hub.gets(NAME)
    assert first.range is None and first.sent == 1_000_000
    resumed_at = int(second.range.removeprefix("bytes=").rstrip("-"))
    assert 0 < resumed_at <= 1_000_000 and resumed_at % CHUNK == 0  # whole chunks that reached the disk
    assert second.status == 206 and second.sent == len(payload) - resumed_at


def test_killed_process_resumes_from_its_partial_file(hub: FakeHub, payload: bytes, tmp_path: Path) -> None:
    """A download process SIGKILLed mid-transfer; the next process fetches only the rest (Range from the partial)."""
    script = textwrap.dedent(f"""
        import sys
        from pathlib import Path
        import huggingface_hub.constants as c
        c.DOWNLOAD_CHUNK_SIZE = {CHUNK}
        from gallery.download import fetch
        from gallery.resolve import HubFile
        fetch(HubFile({REPO!r}, {NAME!r}), {DEST!r}, models_dir=Path(sys.argv[1]), progress=False)
        print("done")
    """)
    env = dict(os.environ, HF_ENDPOINT=hub.url, PYTHONPATH=str(ROOT), HF_HUB_DISABLE_TELEMETRY="1")
    partial = tmp_path / f"llama-cpp/models/{REPO}/.{NAME}.partial"
    hub.throttle = (CHUNK, 0.02)  # ~3 MiB/s: the kill lands mid-transfer
    proc = subprocess.Popen([sys.executable, "-c", script, str(tmp_path)], env=env, cwd=ROOT)
    deadline = time.monotonic() + 30
    while not (partial.exists() and partial.stat().st_size >= 1024 * 1024):
        assert proc.poll() is None and time.monotonic() < deadline, "download finished or stalled before the kill"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    have = partial.stat().st_size
    assert 0 < have < len(payload) and not (tmp_path / DEST).exists()
    hub.throttle = None
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path)], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / DEST).read_bytes() == payload
    last = hub.gets(NAME)[-1]
    assert last.range == f"bytes={have}-" and last.status == 206 and last.sent == len(payload) - have
    assert _leftovers(tmp_path) == [NAME]


def test_sha256_mismatch_is_rejected_and_nothing_installed(hub: FakeHub, payload: bytes, tmp_path: Path) -> None:
    corrupt = bytearray(payload)
    corrupt[12345] ^= 0xFF
    hub.serve_instead[NAME] = bytes(corrupt)  # same size, one byte flipped: hf_hub_download would accept it
    with pytest.raises(ChecksumMismatchError) as err:
        _fetch(hub, tmp_path, sha256=hashlib.sha256(payload).hexdigest())
    assert err.value.actual == hashlib.sha256(corrupt).hexdigest()
    assert _leftovers(tmp_path) == []  # no destination, no partial kept


def test_pin_that_disagrees_with_the_hub_is_refused_before_downloading(hub: FakeHub, tmp_path: Path) -> None:
    with pytest.raises(DownloadError, match="gallery pins sha256"):
        _fetch(hub, tmp_path, sha256="0" * 64)
    assert hub.gets(NAME) == [] and _leftovers(tmp_path) == []


def test_stale_partial_of_another_version_is_discarded(hub: FakeHub, payload: bytes, tmp_path: Path) -> None:
    partial = tmp_path / f"llama-cpp/models/{REPO}/.{NAME}.partial"
    partial.parent.mkdir(parents=True)
    partial.write_bytes(b"x" * 5000)
    partial.with_name(partial.name + ".json").write_text('{"sha256": "' + "1" * 64 + '", "size": 5000}')
    assert _fetch(hub, tmp_path).path.read_bytes() == payload
    assert hub.gets(NAME)[-1].range is None


@pytest.mark.parametrize("dest", ["../outside.gguf", "/etc/passwd", "llama-cpp/../../x.gguf", ""])
def test_traversal_is_refused_before_any_request(hub: FakeHub, tmp_path: Path, dest: str) -> None:
    with pytest.raises(UnsafePathError):
        fetch(HubFile(REPO, NAME), dest, models_dir=tmp_path / "models", endpoint=hub.url, progress=False)
    assert hub.log == []


def test_symlink_escape_is_refused(hub: FakeHub, tmp_path: Path) -> None:
    models = tmp_path / "models"
    models.mkdir()
    (models / "llama-cpp").symlink_to(tmp_path)  # a link inside the models dir pointing out of it
    with pytest.raises(UnsafePathError):
        fetch(HubFile(REPO, NAME), f"llama-cpp/{NAME}", models_dir=models, endpoint=hub.url, progress=False)


def test_missing_file_and_repo(hub: FakeHub, tmp_path: Path) -> None:
    with pytest.raises(EntryNotFoundError, match="not found"):
        fetch(HubFile(REPO, "nope.gguf"), "a/nope.gguf", models_dir=tmp_path, endpoint=hub.url, progress=False)
    with pytest.raises(EntryNotFoundError):
        fetch(HubFile("no/such", NAME), "a/x.gguf", models_dir=tmp_path, endpoint=hub.url, progress=False)


def test_unreachable_hub_is_a_download_error(tmp_path: Path) -> None:
    with pytest.raises(DownloadError, match="cannot get metadata"):
        fetch(HubFile(REPO, NAME), DEST, models_dir=tmp_path, endpoint="http://127.0.0.1:9", progress=False)
