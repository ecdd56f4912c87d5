"""Read and validate GGUF files in Python, before llama.cpp ever sees them.

llama.cpp aborts the whole process on some malformed inputs, so the backend checks the header here first:
magic, version, counts that fit the file, every tensor's data inside the file. The same reader serves the
gallery (architecture facts for the memory model) and the quantizer (tensor inventory for plans).
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from .errors import InvalidGGUFError, ModelNotFoundError

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
_HEADER = struct.Struct("<4sIQQ")  # magic, version, n_tensors, n_kv
# Arrays longer than this (vocabularies, merges) are summarised as their length, not loaded.
_MAX_ARRAY_ITEMS = 4096


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a GGUF file: ggml-order dims `ne` (ne[0] is the row length), ggml `type_name`,
    byte size and absolute file offset."""

    name: str
    ne: tuple[int, ...]
    type_name: str
    n_bytes: int
    offset: int

    @property
    def n_elements(self) -> int:
        return n_elements(self.ne)


def n_elements(ne: tuple[int, ...]) -> int:
    """Number of elements of a tensor with dims `ne`."""
    n = 1
    for d in ne:
        n *= d
    return n


@dataclass(frozen=True)
class GGUFInfo:
    """The header of a GGUF file: metadata (long arrays summarised by length) and the tensor table."""

    path: str
    version: int
    metadata: dict[str, Any]
    tensors: tuple[TensorInfo, ...] = field(repr=False)
    file_size: int = 0

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", ""))

    def arch_key(self, key: str, default: Any = None) -> Any:
        """`<arch>.<key>` from the metadata, e.g. `arch_key("block_count")`."""
        return self.metadata.get(f"{self.architecture}.{key}", default)

    @property
    def nextn_layers(self) -> int:
        """Number of bundled MTP (next-n) layers; 0 when the model has no head."""
        return int(self.arch_key("nextn_predict_layers", 0) or 0)

    @property
    def block_count(self) -> int:
        """All blocks, trunk plus MTP layers (llama.cpp's `n_layer_all`)."""
        return int(self.arch_key("block_count", 0) or 0)

    @property
    def trunk_layers(self) -> int:
        return self.block_count - self.nextn_layers

    @cached_property
    def tensor_names(self) -> frozenset[str]:
        return frozenset(t.name for t in self.tensors)

    @property
    def has_mtp_head(self) -> bool:
        """True when the file declares an MTP layer *and* carries its `nextn.eh_proj` weights.

        Checking the tensor too matters: creating an MTP context without it is a GGML_ASSERT abort.
        """
        if self.nextn_layers <= 0:
            return False
        return f"blk.{self.trunk_layers}.nextn.eh_proj.weight" in self.tensor_names

    @property
    def has_rank_head(self) -> bool:
        """A classification head, which llama.cpp's rank pooling (reranking) reads: `cls` or `cls.output`."""
        return bool({"cls.weight", "cls.output.weight"} & self.tensor_names)

    @property
    def chat_template(self) -> str | None:
        value = self.metadata.get("tokenizer.chat_template")
        return str(value) if value else None

    @property
    def tensor_bytes(self) -> int:
        return sum(t.n_bytes for t in self.tensors)


def check_header(path: str | Path) -> tuple[int, int, int]:
    """Check the fixed GGUF header of `path` and return `(version, n_tensors, n_kv)`.

    Raises:
        ModelNotFoundError: the path does not exist.
        InvalidGGUFError: anything else that would make llama.cpp refuse or crash on the file.
    """
    p = Path(path)
    if not p.exists():
        raise ModelNotFoundError(p)
    if not p.is_file():
        raise InvalidGGUFError(p, "not a regular file")
    size = p.stat().st_size
    if size < _HEADER.size:
        raise InvalidGGUFError(p, f"file is {size} bytes, shorter than a GGUF header ({_HEADER.size} bytes)")
    with open(p, "rb") as f:
        head = f.read(_HEADER.size)
    magic, version, n_tensors, n_kv = _HEADER.unpack(head)
    if magic != GGUF_MAGIC:
        if magic == b"\0\0\0\0":
            raise InvalidGGUFError(p, "zeroed header (bad magic 00000000): the file is empty or was never written")
        raise InvalidGGUFError(p, f"bad magic {magic!r}, expected {GGUF_MAGIC!r}")
    if version not in SUPPORTED_VERSIONS:
        raise InvalidGGUFError(p, f"unsupported GGUF version {version} (supported: {SUPPORTED_VERSIONS})")
    # Each KV pair needs at least 12 bytes and each tensor info at least 24: counts beyond that are corrupt.
    if n_kv * 12 + n_tensors * 24 > size:
        raise InvalidGGUFError(p, f"corrupt header: {n_tensors} tensors and {n_kv} keys cannot fit in {size} bytes")
    return version, n_tensors, n_kv


# GGUF value types -> struct format (scalars); 8 is string, 9 is array.
_SCALAR = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9


class _Cursor:
    """Bounds-checked little-endian reads over the mapped file."""

    def __init__(self, buf: memoryview, path: Path) -> None:
        self.buf, self.pos, self.path = buf, 0, path

    def unpack(self, fmt: str) -> Any:
        size = struct.calcsize("<" + fmt)
        if self.pos + size > len(self.buf):
            raise InvalidGGUFError(self.path, f"truncated header (needed {size} bytes at offset {self.pos})")
        value = struct.unpack_from("<" + fmt, self.buf, self.pos)
        self.pos += size
        return value[0] if len(value) == 1 else value

    def string(self) -> str:
        n = self.unpack("Q")
        if self.pos + n > len(self.buf):
            raise InvalidGGUFError(self.path, f"corrupt header: a {n}-byte string at offset {self.pos} overruns the file")
        raw = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        return raw.decode("utf-8", "replace")

    def value(self, vtype: int) -> Any:
        if vtype in _SCALAR:
            return self.unpack(_SCALAR[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            itype, n = self.unpack("I"), self.unpack("Q")
            if n > len(self.buf):
                raise InvalidGGUFError(self.path, f"corrupt header: array of {n} items at offset {self.pos}")
            if n > _MAX_ARRAY_ITEMS:  # vocabularies, merges: skip, keep the length
                self.skip_array(itype, n)
                return {"array_len": n}
            return [self.value(itype) for _ in range(n)]
        raise InvalidGGUFError(self.path, f"corrupt header: unknown value type {vtype} at offset {self.pos}")

    def skip_array(self, itype: int, n: int) -> None:
        if itype in _SCALAR:
            self.pos += struct.calcsize("<" + _SCALAR[itype]) * n
        elif itype == _STRING:
            buf, pos = self.buf, self.pos
            for _ in range(n):
                pos += 8 + struct.unpack_from("<Q", buf, pos)[0]
            self.pos = pos
        else:
            for _ in range(n):
                self.value(itype)
        if self.pos > len(self.buf):
            raise InvalidGGUFError(self.path, "truncated header inside an array")


def _tensor_nbytes(ne: tuple[int, ...], type_id: int, path: Path, name: str) -> tuple[str, int]:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    try:
        qtype = GGMLQuantizationType(type_id)
    except ValueError:
        raise InvalidGGUFError(path, f"tensor {name!r} has unknown ggml type {type_id}") from None
    block, size = GGML_QUANT_SIZES[qtype]
    n = n_elements(ne)
    if ne and ne[0] % block:
        raise InvalidGGUFError(path, f"tensor {name!r}: row of {ne[0]} is not whole {qtype.name} blocks of {block}")
    return qtype.name, n // block * size


def read_gguf(path: str | Path) -> GGUFInfo:
    """Parse the header and tensor table of a GGUF file, checking that every tensor lies inside the file.

    A streaming parser over an mmap: long arrays (token lists, merges) are skipped and summarised as
    `{"array_len": n}`, so a 248k-token vocabulary costs milliseconds, not seconds.

    Raises:
        ModelNotFoundError, InvalidGGUFError: see `check_header`; also for a header that overruns the file,
            unknown value or tensor types, and tensors that point past its end (a truncated download).
    """
    version, n_tensors, n_kv = check_header(path)
    p = Path(path)
    size = p.stat().st_size
    with open(p, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        buf = memoryview(mm)
        try:
            cur = _Cursor(buf, p)
            cur.pos = _HEADER.size
            metadata: dict[str, Any] = {}
            for _ in range(n_kv):
                key = cur.string()
                metadata[key] = cur.value(cur.unpack("I"))
            raw_tensors = []
            for _ in range(n_tensors):
                name = cur.string()
                n_dims = cur.unpack("I")
                if n_dims > 8:
                    raise InvalidGGUFError(p, f"tensor {name!r} declares {n_dims} dimensions")
                ne = tuple(cur.unpack("Q") for _ in range(n_dims))
                raw_tensors.append((name, ne, cur.unpack("I"), cur.unpack("Q")))
            align = int(metadata.get("general.alignment", 32) or 32)
            data_start = (cur.pos + align - 1) // align * align
        finally:
            buf.release()
    tensors = []
    for name, ne, type_id, rel in raw_tensors:
        type_name, n_bytes = _tensor_nbytes(ne, type_id, p, name)
        t = TensorInfo(name=name, ne=ne, type_name=type_name, n_bytes=n_bytes, offset=data_start + rel)
        if t.offset + t.n_bytes > size:
            raise InvalidGGUFError(
                p, f"truncated: tensor {t.name!r} ends at byte {t.offset + t.n_bytes} but the file has {size} bytes"
            )
        tensors.append(t)
    return GGUFInfo(path=os.fspath(p), version=version, metadata=metadata, tensors=tuple(tensors), file_size=size)
