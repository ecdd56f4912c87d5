"""llama.cpp importance-matrix files: the GGUF format `llama-imatrix` writes (and the legacy `.dat` it reads).

GGUF layout (tools/imatrix/imatrix.cpp `save_imatrix`, common/imatrix-loader.cpp): `general.type = "imatrix"`,
`imatrix.datasets` (string array), `imatrix.chunk_count` and `imatrix.chunk_size` (u32); per weight two F32
tensors, sorted by name: `<weight>.in_sum2` with ne = [n_per_row, n_mat] (raw sums of squared activations per
input column, one row per expert) and `<weight>.counts` with ne = [1, n_mat] (activation rows seen per expert).
llama-quantize divides sums by counts, and uses 1.0 for an expert whose count is 0.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from backend.core.errors import InvalidGGUFError, MissingImatrixError, ModelNotFoundError

_SUMS, _COUNTS = ".in_sum2", ".counts"


@dataclass
class ImatrixEntry:
    """Accumulated statistics of one weight: `sums[n_mat, n_per_row]` and `counts[n_mat]`."""

    sums: np.ndarray
    counts: np.ndarray

    @property
    def size(self) -> int:
        """Floats llama.cpp receives for this weight (n_per_row x n_mat)."""
        return int(self.sums.size)

    def normalized(self) -> np.ndarray:
        """Mean squared activation per column, flattened as llama-quantize passes it (count 0 -> 1.0)."""
        counts = self.counts.astype(np.float64)[:, None]
        out = np.where(counts > 0, self.sums / np.maximum(counts, 1), 1.0)
        return np.ascontiguousarray(out, dtype=np.float32).reshape(-1)

    @property
    def coverage(self) -> float:
        """Fraction of matrices (experts) that saw at least one activation."""
        return float(np.count_nonzero(self.counts)) / max(1, self.counts.size)


@dataclass
class Imatrix:
    """A whole importance matrix: entries by weight name plus the provenance llama-quantize records."""

    entries: dict[str, ImatrixEntry] = field(default_factory=dict)
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0
    chunk_size: int = 0
    path: str = ""

    def merge(self, other: Imatrix) -> None:
        """Add another matrix's sums and counts (as `llama-imatrix --in-file` does)."""
        for name, e in other.entries.items():
            mine = self.entries.get(name)
            if mine is None:
                self.entries[name] = ImatrixEntry(e.sums.copy(), e.counts.copy())
            elif mine.sums.shape != e.sums.shape:
                raise MissingImatrixError(f"cannot merge {name}: shapes {mine.sums.shape} and {e.sums.shape} differ")
            else:
                mine.sums += e.sums
                mine.counts += e.counts
        self.datasets += [d for d in other.datasets if d not in self.datasets]
        self.chunk_count += other.chunk_count


def write_imatrix(path: str | Path, imatrix: Imatrix) -> Path:
    """Write `imatrix` in llama.cpp's GGUF imatrix format (atomically: temp file, then rename)."""
    from gguf import GGUFWriter

    path = Path(path)
    tmp = path.with_name(path.name + ".partial")
    writer = GGUFWriter(os.fspath(tmp), arch="imatrix", use_temp_file=False)
    # GGUFWriter always adds general.architecture; llama.cpp ignores it in an imatrix file.
    writer.add_type("imatrix")
    writer.add_array("imatrix.datasets", imatrix.datasets or ["unknown"])
    writer.add_uint32("imatrix.chunk_count", int(imatrix.chunk_count))
    writer.add_uint32("imatrix.chunk_size", int(imatrix.chunk_size))
    for name in sorted(imatrix.entries):
        e = imatrix.entries[name]
        writer.add_tensor(name + _SUMS, np.ascontiguousarray(e.sums, dtype=np.float32))
        writer.add_tensor(name + _COUNTS, np.ascontiguousarray(e.counts, dtype=np.float32).reshape(-1, 1))
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    os.replace(tmp, path)
    return path


def read_imatrix(path: str | Path) -> Imatrix:
    """Read a GGUF imatrix, or a legacy `.dat` one (sums there are already per-call means).

    Raises:
        ModelNotFoundError: no such file.
        InvalidGGUFError: neither format, or sums without counts.
    """
    p = Path(path)
    if not p.is_file():
        raise ModelNotFoundError(p, "importance matrix")
    with open(p, "rb") as f:
        magic = f.read(4)
    return _read_gguf(p) if magic == b"GGUF" else _read_legacy(p)


def _read_gguf(p: Path) -> Imatrix:
    from gguf import GGUFReader

    try:
        reader = GGUFReader(os.fspath(p), "r")
        fields = {k: f.contents() for k, f in reader.fields.items() if k.startswith("imatrix.")}
        arrays = {t.name: np.array(t.data, dtype=np.float32) for t in reader.tensors}
    except Exception as exc:  # gguf raises assorted errors on corrupt input
        raise InvalidGGUFError(p, f"unreadable imatrix ({type(exc).__name__}: {exc})") from exc
    entries = {}
    for tname, sums in arrays.items():
        if not tname.endswith(_SUMS):
            continue
        name = tname[: -len(_SUMS)]
        counts = arrays.get(name + _COUNTS)
        if counts is None:
            raise InvalidGGUFError(p, f"imatrix has {tname} but no {name + _COUNTS}")
        counts = counts.reshape(-1).astype(np.float64)
        entries[name] = ImatrixEntry(sums.reshape(counts.size, -1).astype(np.float64), counts)
    datasets = fields.get("imatrix.datasets") or []
    return Imatrix(entries, list(datasets), int(fields.get("imatrix.chunk_count", 0)),
                   int(fields.get("imatrix.chunk_size", 0)), os.fspath(p))


def _read_legacy(p: Path) -> Imatrix:
    """Legacy `.dat`: int n; per entry (int len, name, int ncall, int nval, float[nval]); optional trailer."""
    data = p.read_bytes()
    try:
        (n,), off = struct.unpack_from("<i", data, 0), 4
        if n < 1:
            raise ValueError("no entries")
        entries = {}
        for _ in range(n):
            (ln,) = struct.unpack_from("<i", data, off)
            name = data[off + 4: off + 4 + ln].decode()
            ncall, nval = struct.unpack_from("<ii", data, off + 4 + ln)
            off += 12 + ln
            vals = np.frombuffer(data, dtype="<f4", count=nval, offset=off).astype(np.float64)
            off += 4 * nval
            # legacy sums are per-call means times ncall; llama-quantize divides them by ncall, as normalized() does
            entries[name] = ImatrixEntry(vals.reshape(1, -1), np.array([max(ncall, 1)], dtype=np.float64))
    except (struct.error, ValueError, UnicodeDecodeError) as exc:
        raise InvalidGGUFError(p, f"not a GGUF or legacy imatrix ({exc})") from exc
    return Imatrix(entries, [], 0, 0, os.fspath(p))


def coverage_report(imatrix: Imatrix, wanted: Iterable[tuple[str, int]]) -> list[tuple[str, str, float]]:
    """`(name, status, expert coverage)` for each wanted `(weight name, expected size)`.

    status: "ok", "missing", "size" (entry has another size: a different model) or "empty" (never activated).
    """
    out = []
    for name, size in wanted:
        e = imatrix.entries.get(name)
        if e is None:
            out.append((name, "missing", 0.0))
        elif e.size != size:
            out.append((name, "size", 0.0))
        elif not np.any(e.counts):
            out.append((name, "empty", 0.0))
        else:
            out.append((name, "ok", e.coverage))
    return out


def imatrix_arrays(imatrix: Imatrix, sizes: Mapping[str, int]) -> dict[str, np.ndarray]:
    """Normalized float32 arrays for the weights in `sizes` whose entries have the expected size."""
    return {n: imatrix.entries[n].normalized() for n, s in sizes.items()
            if n in imatrix.entries and imatrix.entries[n].size == s}
