"""File checks shared by downloads and the quantizer: sha256 (with a progress bar for big files) and free disk space.

`free_bytes` is the one place free space is measured, so tests can point it at a small directory or patch it.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

from .errors import InsufficientDiskSpaceError

_HASH_CHUNK = 8 * 1024 * 1024
PROGRESS_FROM_BYTES = 256 * 1024 * 1024  # smaller files hash in well under a second: no bar


def sha256_file(path: str | Path, *, progress: bool = False) -> str:
    """Hex sha256 of a file, read in 8 MiB chunks; `progress` shows a tqdm bar for files of 256 MiB and more."""
    from tqdm import tqdm

    path = Path(path)
    h = hashlib.sha256()
    size = path.stat().st_size
    bar = tqdm(total=size, unit="B", unit_scale=True, unit_divisor=1024, leave=False, desc=f"sha256 {path.name}",
               disable=not progress or size < PROGRESS_FROM_BYTES)
    with open(path, "rb") as f, bar:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
            bar.update(len(chunk))
    return h.hexdigest()


def free_bytes(path: str | Path) -> int:
    """Bytes free to an unprivileged writer on the filesystem that holds `path` (or its nearest existing parent)."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def require_free_space(path: str | Path, need: int, *, what: str) -> None:
    """Refuse to start writing `need` bytes under `path` when its filesystem has less free.

    Raises:
        InsufficientDiskSpaceError: names `what`, the need and the free space.
    """
    from .units import human

    free = free_bytes(path)
    if need > free:
        raise InsufficientDiskSpaceError(
            f"{what} needs {human(need)} ({need} bytes) in {path}, but only {human(free)} ({free} bytes) is free "
            "there; free some space or choose another directory", path=path, need=need, free=free)
