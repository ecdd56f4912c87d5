"""Verified, resumable downloads of hub files into the models directory.

huggingface_hub does the talking (`hf_hub_url`, `get_hf_file_metadata` and its `http_get`, so HF_ENDPOINT, HF_TOKEN,
its retries and its progress bar all apply). What it does not do, we add (hf-hub-local.md):

* **sha256 verification**: against the gallery's pin, else the hub's LFS sha256 (the HEAD's linked ETag, or the
  paths-info API). `hf_hub_download` stores a corrupted file silently; here a mismatch deletes the data and raises
  `ChecksumMismatchError` before anything is installed. A pin that differs from what the hub now serves is refused
  before downloading. A file already at the destination is verified the same way (size first, when the hub says it)
  before it is trusted, and fetched again when it fails.
* **free space**: the bytes still to transfer must fit on the disk before the transfer starts
  (`backend.core.files.require_free_space`, shared with the quantizer).
* **resume across processes**: `hf_hub_download` writes to a per-process `<uuid>.incomplete`, so a new process
  starts from zero. We keep one stable partial file next to the destination (`.<name>.partial`, with a small
  `.partial.json` recording which sha256/size it belongs to) and hand it to `http_get` with `resume_size`, which
  sends `Range: bytes=<size>-`. A lock file keeps two processes from appending to the same partial. A resumed file
  that fails its sha256 is fetched once more from the start (the partial's bytes could not be checked on their own).
* **atomic landing**: the verified partial is fsynced and `os.replace`d onto the destination, so a file at the
  destination is always complete and verified.
* **no traversal**: destinations must stay inside the models dir (checked before any request).
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from backend.core.errors import ChecksumMismatchError, DownloadError, EntryNotFoundError, UnsafePathError
from backend.core.files import require_free_space, sha256_file

from .resolve import HubFile, hub_endpoint, hub_errors
from .schema import safe_relative_path

log = logging.getLogger(__name__)
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class FetchResult:
    """Where the file landed, its verified sha256 and size, and how many bytes this call transferred."""

    path: Path
    sha256: str
    size: int
    transferred: int
    reused: bool


@dataclass(frozen=True)
class DownloadProgress:
    """How far the download of a destination has got, read from the disk, so it is the same whichever process
    (or thread) is downloading it."""

    dest: Path
    have: int  # bytes on disk: the landed file's size once it is there, else what the partial holds so far
    complete: bool  # the verified file is at the destination


def download_progress(dest: Path) -> DownloadProgress:
    """The progress of `fetch` towards `dest` (a path under the models dir, as `safe_join` returns it)."""
    # The destination is looked at again after the partial: the download may land it between the two looks.
    for path, complete in ((dest, True), (_Partial(dest).data, False), (dest, True)):
        try:
            return DownloadProgress(dest, path.stat().st_size, complete)
        except FileNotFoundError:
            continue
    return DownloadProgress(dest, 0, False)


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


def _metadata(file: HubFile, endpoint: str, token: str | None):
    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    from huggingface_hub.errors import RemoteEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    url = hf_hub_url(file.repo, file.path, revision=file.revision, endpoint=endpoint)
    try:
        return url, get_hf_file_metadata(url, token=token, endpoint=endpoint)
    except (RemoteEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError) as exc:
        raise EntryNotFoundError(f"{file.uri} not found on {endpoint}: {type(exc).__name__}") from None
    except hub_errors() as exc:  # network errors, offline mode, 5xx: all "cannot reach the hub right now"
        raise DownloadError(f"cannot get metadata of {file.uri} from {endpoint}: {exc}") from exc


def _hub_sha256(file: HubFile, etag: str | None, endpoint: str, token: str | None) -> str | None:
    """The hub's LFS sha256 of `file`: the linked ETag when it is one, else the paths-info API."""
    if etag and _SHA256_RE.match(etag):
        return etag
    from huggingface_hub import HfApi

    try:
        infos = HfApi(endpoint=endpoint, token=token).get_paths_info(file.repo, [file.path], revision=file.revision)
    except hub_errors() as exc:  # a missing answer only means "no hub sha256"
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
        except hub_errors() as exc:  # HTTP/network/consistency/disk errors: keep the partial for the next run
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

    A file already at the destination is trusted only once verified: against the pin alone when there is one (no
    request, so it works offline), else against the hub's size and LFS sha256. A file that fails is fetched again.

    Args:
        file: the hub file.
        destination: relative path under `models_dir` (e.g. `llama-cpp/models/owner/repo/File.gguf`).
        models_dir: the models directory.
        sha256: the pinned digest; None means "use the hub's LFS sha256".
        token: hub token (default: huggingface_hub's, i.e. HF_TOKEN or the stored login).
        endpoint: hub URL (default: HF_ENDPOINT, else huggingface.co).
        progress: show progress bars (transfer, and hashing of big files).

    Returns:
        The file, with the sha256 computed from its bytes by this call.

    Raises:
        UnsafePathError: `destination` escapes `models_dir` (nothing is requested).
        EntryNotFoundError: the repo or file does not exist.
        InsufficientDiskSpaceError: the rest of the file does not fit on the disk (checked before transferring).
        ChecksumMismatchError: the bytes do not match; nothing is installed and the partial is deleted.
        DownloadError: the hub is unreachable (and the file is not already there, verified by its pin), no sha256 is
            known, the pin disagrees with the hub, or the transfer broke off (the partial is kept; running again
            resumes it).
    """
    from filelock import FileLock
    from huggingface_hub.utils import build_hf_headers

    dest = safe_join(models_dir, destination)
    rejected = None  # identity of a destination file already found bad
    if sha256 and dest.is_file():
        if (found := _verified(dest, sha256, None, progress)) is not None:
            return found
        rejected = _identity(dest)
    endpoint = hub_endpoint(endpoint)
    url, meta = _metadata(file, endpoint, token)
    expected = _expected_sha256(file, sha256, _hub_sha256(file, meta.etag, endpoint, token))
    dest.parent.mkdir(parents=True, exist_ok=True)
    headers = build_hf_headers(token=token)
    download_url = meta.location or url
    if _origin(download_url) != _origin(url):
        headers.pop("authorization", None)  # signed CDN URL: never forward the token off the hub
    partial = _Partial(dest)
    with FileLock(partial.lock):
        # Checked under the lock: another process may have landed the file while we waited.
        unchecked = dest.is_file() and _identity(dest) != rejected
        found = _verified(dest, expected, meta.size, progress) if unchecked else None
        if found is None:
            dest.unlink(missing_ok=True)  # a bad file is no use to anyone, and its space counts for the new one
            found = _download(download_url, partial, dest, expected, meta.size, headers, progress)
    # Safe once the destination exists: a process still waiting on this lock finds the file and returns.
    # An interrupted download keeps its lock next to its partial.
    partial.lock.unlink(missing_ok=True)
    return found


def _identity(path: Path) -> tuple[int, int, int, int]:
    st = path.stat()
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def _verified(dest: Path, sha256: str, size: int | None, progress: bool) -> FetchResult | None:
    """`dest` as a reused FetchResult when its size (if known) and sha256 match; None (logged) when not."""
    have = dest.stat().st_size
    if size is not None and have != size:
        log.warning("%s is %d bytes, the hub's file %d: fetching it again", dest, have, size)
        return None
    actual = sha256_file(dest, progress=progress)
    if actual != sha256:
        log.warning("%s has sha256 %s, expected %s (corrupt, or changed on the hub): fetching it again",
                    dest, actual, sha256)
        return None
    return FetchResult(dest, actual, have, 0, reused=True)


def _download(url: str, partial: _Partial, dest: Path, expected: str, size: int | None, headers: dict[str, str],
              progress: bool) -> FetchResult:
    """Transfer (resuming a matching partial), verify and land `dest`. Called under the destination's lock.

    A partial holds bytes of an earlier run that cannot be checked on their own (the hub publishes only the whole
    file's sha256): when a resumed file fails its check, the partial is the suspect, so it is dropped and the file
    fetched once more from the start before the mismatch counts.
    """
    have = partial.prepare(expected, size)
    if size is not None:
        require_free_space(dest.parent, size - have, what=f"downloading {dest.name}")
    if have:
        log.info("resuming %s at %d of %s bytes", dest.name, have, size)
    transferred = _transfer(url, partial, have, size, dest.name, headers, progress)
    actual = sha256_file(partial.data, progress=progress)
    if actual != expected and have:
        log.warning("%s: resumed from a partial of %d bytes, the result has sha256 %s instead of %s: "
                    "downloading it again from the start", dest.name, have, actual, expected)
        partial.discard()
        have = partial.prepare(expected, size)
        transferred += _transfer(url, partial, have, size, dest.name, headers, progress)
        actual = sha256_file(partial.data, progress=progress)
    if actual != expected:
        partial.discard()
        partial.lock.unlink(missing_ok=True)  # nothing left to resume
        raise ChecksumMismatchError(dest, expected, actual)
    os.replace(partial.data, dest)
    partial.state.unlink(missing_ok=True)
    _fsync_dir(dest.parent)
    return FetchResult(dest, actual, dest.stat().st_size, transferred, reused=False)


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
