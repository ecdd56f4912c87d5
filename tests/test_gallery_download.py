"""Downloads against a local fake hub (real huggingface_hub client via HF_ENDPOINT): verified, resumable within a
call and across processes, atomic, and refusing traversal."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import wait_until
from fakehub import FakeHub

from backend.core import files
from backend.core.errors import (
    ChecksumMismatchError,
    DownloadError,
    EntryNotFoundError,
    InsufficientDiskSpaceError,
    UnsafePathError,
)
from gallery import download
from gallery.download import DownloadProgress, download_progress, fetch
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
    again = _fetch(hub, tmp_path)  # present, no pin: the hub's size and sha256 decide (a HEAD, no transfer)
    assert again.reused and again.sha256 == hashlib.sha256(payload).hexdigest() and len(hub.gets(NAME)) == 1


@pytest.fixture()
def hashed(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Names of the files `gallery.download` hashes, in order."""
    names: list[str] = []

    def recording(path: Path, *, progress: bool = False) -> str:
        names.append(Path(path).name)
        return files.sha256_file(path, progress=progress)

    monkeypatch.setattr(download, "sha256_file", recording)
    return names


def _corrupt(data: bytes) -> bytes:
    bad = bytearray(data)
    bad[len(bad) // 2] ^= 0xFF
    return bytes(bad)


@pytest.mark.parametrize("pinned", [True, False], ids=["pinned", "hub-sha256"])
def test_corrupted_destination_is_fetched_again(hub: FakeHub, payload: bytes, tmp_path: Path, hashed: list[str],
                                                pinned: bool) -> None:
    sha = hashlib.sha256(payload).hexdigest()
    dest = tmp_path / DEST
    dest.parent.mkdir(parents=True)
    dest.write_bytes(_corrupt(payload))  # right size, wrong bytes: only the sha256 tells
    result = _fetch(hub, tmp_path, sha256=sha if pinned else None)
    assert (result.reused, result.sha256, result.transferred) == (False, sha, len(payload))
    assert dest.read_bytes() == payload and _leftovers(tmp_path) == [NAME]
    assert hashed == [NAME, f".{NAME}.partial"]  # the bad file, then the fresh download
    [get] = hub.gets(NAME)
    assert get.range is None  # the bad file was not taken as a partial to resume


def test_wrong_size_destination_is_fetched_again_without_hashing_it(hub: FakeHub, payload: bytes, tmp_path: Path,
                                                                    hashed: list[str]) -> None:
    dest = tmp_path / DEST
    dest.parent.mkdir(parents=True)
    dest.write_bytes(payload[:-1000])  # a truncated copy
    result = _fetch(hub, tmp_path)
    assert not result.reused and dest.read_bytes() == payload
    assert hashed == [f".{NAME}.partial"]  # the size already ruled the old file out


def test_pinned_destination_is_verified_offline(payload: bytes, tmp_path: Path, hashed: list[str]) -> None:
    dest = tmp_path / DEST
    dest.parent.mkdir(parents=True)
    dest.write_bytes(payload)
    offline = "http://127.0.0.1:9"
    result = fetch(HubFile(REPO, NAME), DEST, models_dir=tmp_path, endpoint=offline, progress=False,
                   sha256=hashlib.sha256(payload).hexdigest())
    assert result.reused and result.sha256 == hashlib.sha256(payload).hexdigest() and hashed == [NAME]
    dest.write_bytes(_corrupt(payload))
    with pytest.raises(DownloadError, match="cannot get metadata"):  # bad, and no hub to fetch it again from
        fetch(HubFile(REPO, NAME), DEST, models_dir=tmp_path, endpoint=offline, progress=False,
              sha256=hashlib.sha256(payload).hexdigest())


def test_corrupt_partial_is_dropped_and_the_file_fetched_from_the_start(hub: FakeHub, payload: bytes,
                                                                       tmp_path: Path) -> None:
    """A partial of the right version but with wrong bytes (a disk error, another writer) must not poison the file."""
    sha = hashlib.sha256(payload).hexdigest()
    partial = tmp_path / f"llama-cpp/models/{REPO}/.{NAME}.partial"
    partial.parent.mkdir(parents=True)
    partial.write_bytes(_corrupt(payload[:1_000_000]))
    partial.with_name(partial.name + ".json").write_text(f'{{"sha256": "{sha}", "size": {len(payload)}}}')
    result = _fetch(hub, tmp_path, sha256=sha)
    assert (result.sha256, result.reused) == (sha, False) and result.path.read_bytes() == payload
    resumed, fresh = hub.gets(NAME)
    assert resumed.range == "bytes=1000000-" and fresh.range is None and fresh.sent == len(payload)
    assert result.transferred == resumed.sent + fresh.sent
    assert _leftovers(tmp_path) == [NAME]


def test_too_little_disk_space_is_refused_before_transferring(hub: FakeHub, payload: bytes, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(files, "free_bytes", lambda path: 1_000_000)
    with pytest.raises(InsufficientDiskSpaceError) as err:
        _fetch(hub, tmp_path)
    assert (err.value.need, err.value.free) == (len(payload), 1_000_000)
    assert f"downloading {NAME} needs 4 MiB ({len(payload)} bytes)" in str(err.value)
    assert "only 977 KiB (1000000 bytes) is free" in str(err.value)
    assert hub.gets(NAME) == []  # only the HEAD that told the size
    assert not (tmp_path / DEST).exists()


def test_disk_space_counts_only_what_is_left_to_transfer(hub: FakeHub, payload: bytes, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    sha = hashlib.sha256(payload).hexdigest()
    partial = tmp_path / f"llama-cpp/models/{REPO}/.{NAME}.partial"
    partial.parent.mkdir(parents=True)
    partial.write_bytes(payload[:4_000_000])
    partial.with_name(partial.name + ".json").write_text(f'{{"sha256": "{sha}", "size": {len(payload)}}}')
    monkeypatch.setattr(files, "free_bytes", lambda path: len(payload) - 4_000_000)
    assert _fetch(hub, tmp_path, sha256=sha).path.read_bytes() == payload


def test_free_space_of_a_real_directory(tmp_path: Path) -> None:
    free = files.free_bytes(tmp_path / "not" / "made" / "yet")  # measured on the nearest existing parent
    assert free > 0
    files.require_free_space(tmp_path / "not", 1, what="one byte")
    with pytest.raises(InsufficientDiskSpaceError, match=r"^a petabyte more needs .* TiB \(\d+ bytes\) in .* only"):
        files.require_free_space(tmp_path, free + 2**50, what="a petabyte more")


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
    assert download_progress(tmp_path / DEST) == DownloadProgress(tmp_path / DEST, 0, complete=False)
    hub.throttle = (CHUNK, 0.02)  # ~3 MiB/s: the kill lands mid-transfer
    proc = subprocess.Popen([sys.executable, "-c", script, str(tmp_path)], env=env, cwd=ROOT)

    def mid_transfer() -> bool:
        assert proc.poll() is None, "download finished before the kill"
        return partial.exists() and partial.stat().st_size >= 1024 * 1024

    wait_until(mid_transfer, 30, 0.02, message="download stalled before the kill")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    have = partial.stat().st_size
    assert 0 < have < len(payload) and not (tmp_path / DEST).exists()
    assert download_progress(tmp_path / DEST) == DownloadProgress(tmp_path / DEST, have, complete=False)
    hub.throttle = None
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path)], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / DEST).read_bytes() == payload
    assert download_progress(tmp_path / DEST) == DownloadProgress(tmp_path / DEST, len(payload), complete=True)
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


def test_a_bug_below_fetch_is_not_relabelled_a_download_error(hub: FakeHub, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Only the hub's and the network's errors mean "cannot download"; a programming error propagates as itself."""
    import huggingface_hub
    import huggingface_hub.file_download as hf_download

    def broken(*args, **kwargs):
        raise TypeError("a bug")

    monkeypatch.setattr(huggingface_hub, "get_hf_file_metadata", broken)
    with pytest.raises(TypeError, match="a bug"):
        _fetch(hub, tmp_path)
    monkeypatch.undo()
    monkeypatch.setattr(hf_download, "http_get", broken)
    with pytest.raises(TypeError, match="a bug"):
        _fetch(hub, tmp_path)
    assert not (tmp_path / DEST).exists()
