"""Verified, resumable downloads of hub files into the models directory.

huggingface_hub does the talking (`hf_hub_url`, `get_hf_file_metadata` and its `http_get`, so HF_ENDPOINT, HF_TOKEN,
its retries and its progress bar all apply). What it does not do, we add (hf-hub-local.md):

* **sha256 verification**: against the gallery's pin, else the hub's LFS sha256 (the HEAD's linked ETag, or the
  paths-info API). `hf_hub_download` stores a corrupted file silently; here a mismatch deletes the data and raises
  `ChecksumMismatchError` before anything is installed. A pin that differs from what the hub now serves is refused
  before downloading.
* **resume across processes**: `hf_hub_download` writes to a per-process `<uuid>.incomplete`, so a new process
  starts from zero. We keep one stable partial file next to the destination (`.<name>.partial`, with a small
  `.partial.json` recording which sha256/size it belongs to) and hand it to `http_get` with `resume_size`, which
  sends `Range: bytes=<size>-`. A lock file keeps two processes from appending to the same partial.
* **atomic landing**: the verified partial is fsynced and `os.replace`d onto the destination, so a file at the
  destination is always complete and verified.
* **no traversal**: destinations must stay inside the models dir (checked before any request).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from backend import constants
from backend.errors import ChecksumMismatchError, DownloadError, EntryNotFoundError, UnsafePathError

from .resolve import HubFile
from .schema import safe_relative_path

log = logging.getLogger(__name__)
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_HASH_CHUNK = 8 * 1024 * 1024


@dataclass(frozen=True)
class FetchResult:
    """Where the file landed, its verified sha256 and size, and how many bytes this call transferred."""

    path: Path
    sha256: str
    size: int
    transferred: int
    reused: bool


def safe_join(root: Path, relative: str) -> Path:
    """`root / relative`, refusing absolute paths, `..`, and symlinks that lead outside `root`.

    Raises:
        UnsafePathError: the path would escape `root`.
    """
    if not safe_relative_path(relative):
        raise UnsafePathError(relative, root)
    root_resolved = Path(root).resolve()
    dest = (root_resolved / relative).resolve()
    if not dest.is_relative_to(root_resolved):
        raise UnsafePathError(relative, root)
    return dest


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 8 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def hub_endpoint(endpoint: str | None = None) -> str:
    """The hub URL: `endpoint`, else HF_ENDPOINT as set now (huggingface_hub reads it once, at import), else its
    default."""
    from huggingface_hub import constants as hf_constants

    return (endpoint or constants.hf_endpoint() or hf_constants.ENDPOINT).rstrip("/")


def _metadata(file: HubFile, endpoint: str, token: str | None):
    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    from huggingface_hub.errors import RemoteEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    url = hf_hub_url(file.repo, file.path, revision=file.revision, endpoint=endpoint)
    try:
        return url, get_hf_file_metadata(url, token=token, endpoint=endpoint)
    except (RemoteEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError) as exc:
        raise EntryNotFoundError(f"{file.uri} not found on {endpoint}: {type(exc).__name__}") from None
    except Exception as exc:  # network errors, offline mode, 5xx: all "cannot reach the hub right now"
        raise DownloadError(f"cannot get metadata of {file.uri} from {endpoint}: {exc}") from exc


def _hub_sha256(file: HubFile, etag: str | None, endpoint: str, token: str | None) -> str | None:
    """The hub's LFS sha256 of `file`: the linked ETag when it is one, else the paths-info API."""
    if etag and _SHA256_RE.match(etag):
        return etag
    from huggingface_hub import HfApi

    try:
        infos = HfApi(endpoint=endpoint, token=token).get_paths_info(file.repo, [file.path], revision=file.revision)
    except Exception as exc:  # noqa: BLE001 - a missing answer only means "no hub sha256"
        log.debug("paths-info for %s failed: %s", file.uri, exc)
        return None
    lfs = getattr(infos[0], "lfs", None) if infos else None
    return getattr(lfs, "sha256", None)


def _expected_sha256(file: HubFile, pinned: str | None, hub_sha: str | None) -> str:
    """The digest to verify against: the pin, else the hub's; a pin the hub contradicts is refused."""
    if pinned and hub_sha and pinned != hub_sha:
        raise DownloadError(f"{file.uri}: the gallery pins sha256 {pinned} but the hub now serves {hub_sha}; "
                            "run `apexmtp gallery refresh` (maintainers) or pull a pinned revision")
    if not (pinned or hub_sha):
        raise DownloadError(f"{file.uri}: no sha256 known (no gallery pin, no LFS sha256 on the hub); refusing to "
                            "install a file that cannot be verified")
    return pinned or hub_sha  # type: ignore[return-value]


class _Partial:
    """The stable partial file of a destination and the sidecar saying which file version it holds."""

    def __init__(self, dest: Path) -> None:
        self.data = dest.with_name(f".{dest.name}.partial")
        self.state = dest.with_name(f".{dest.name}.partial.json")
        self.lock = dest.with_name(f".{dest.name}.lock")

    def prepare(self, sha256: str, size: int | None) -> int:
        """Keep the partial only if it belongs to this sha256 and is not longer than `size`; return its length."""
        try:
            state = json.loads(self.state.read_text())
        except (OSError, ValueError):
            state = {}
        have = self.data.stat().st_size if self.data.exists() else 0
        if state.get("sha256") != sha256 or (size is not None and have > size):
            self.discard()
            have = 0
        self.state.write_text(json.dumps({"sha256": sha256, "size": size}))
        return have

    def discard(self) -> None:
        for p in (self.data, self.state):
            p.unlink(missing_ok=True)


def _silent_tqdm():
    from huggingface_hub.utils import tqdm

    class Silent(tqdm):
        def __init__(self, *args, **kwargs) -> None:
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)

    return Silent


def _transfer(url: str, partial: _Partial, have: int, size: int | None, name: str, headers: dict[str, str],
              progress: bool) -> int:
    """Append the rest of the file to the partial with huggingface_hub's `http_get` (Range from `have`)."""
    from huggingface_hub.file_download import http_get

    with open(partial.data, "ab") as f:
        f.seek(0, os.SEEK_END)
        try:
            http_get(url, f, resume_size=have, headers=headers, expected_size=size, displayed_filename=name,
                     tqdm_class=None if progress else _silent_tqdm())
        except Exception as exc:  # HTTP/network/consistency errors: keep the partial for the next run
            f.flush()
            raise DownloadError(
                f"download of {name} interrupted at {f.tell()} bytes ({exc}); run the same command again to resume"
            ) from exc
        f.flush()
        os.fsync(f.fileno())
        return f.tell() - have


def fetch(file: HubFile, destination: str, *, models_dir: Path, sha256: str | None = None, token: str | None = None,
          endpoint: str | None = None, progress: bool = True) -> FetchResult:
    """Download `file` to `models_dir/destination`, verified and resumable (see the module doc).

    Args:
        file: the hub file.
        destination: relative path under `models_dir` (e.g. `llama-cpp/models/owner/repo/File.gguf`).
        models_dir: the models directory.
        sha256: the pinned digest; None means "use the hub's LFS sha256".
        token: hub token (default: huggingface_hub's, i.e. HF_TOKEN or the stored login).
        endpoint: hub URL (default: HF_ENDPOINT, else huggingface.co).
        progress: show huggingface_hub's progress bar.

    Raises:
        UnsafePathError: `destination` escapes `models_dir` (nothing is requested).
        EntryNotFoundError: the repo or file does not exist.
        ChecksumMismatchError: the bytes do not match; nothing is installed and the partial is deleted.
        DownloadError: the hub is unreachable, no sha256 is known, the pin disagrees with the hub, or the transfer
            broke off (the partial is kept; running again resumes it).
    """
    from huggingface_hub.utils import build_hf_headers

    dest = safe_join(models_dir, destination)
    if dest.is_file():
        return FetchResult(dest, sha256 or "", dest.stat().st_size, 0, reused=True)
    endpoint = hub_endpoint(endpoint)
    url, meta = _metadata(file, endpoint, token)
    expected = _expected_sha256(file, sha256, _hub_sha256(file, meta.etag, endpoint, token))
    dest.parent.mkdir(parents=True, exist_ok=True)
    headers = build_hf_headers(token=token)
    download_url = meta.location or url
    if _origin(download_url) != _origin(url):
        headers.pop("authorization", None)  # signed CDN URL: never forward the token off the hub
    partial = _Partial(dest)
    from filelock import FileLock

    with FileLock(partial.lock):
        if dest.is_file():  # another process finished it while we waited
            return FetchResult(dest, expected, dest.stat().st_size, 0, reused=True)
        have = partial.prepare(expected, meta.size)
        if have:
            log.info("resuming %s at %d of %s bytes", dest.name, have, meta.size)
        transferred = _transfer(download_url, partial, have, meta.size, dest.name, headers, progress)
        actual = sha256_file(partial.data)
        if actual != expected:
            partial.discard()
            partial.lock.unlink(missing_ok=True)  # nothing left to resume
            raise ChecksumMismatchError(dest, expected, actual)
        os.replace(partial.data, dest)
        partial.state.unlink(missing_ok=True)
        _fsync_dir(dest.parent)
    # Safe once the destination exists: a process still waiting on this lock finds the file and returns.
    # An interrupted download keeps its lock next to its partial.
    partial.lock.unlink(missing_ok=True)
    return FetchResult(dest, expected, dest.stat().st_size, transferred, reused=False)


def _origin(url: str) -> tuple[str, str]:
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    return parts.scheme, parts.netloc


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
