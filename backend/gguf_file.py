"""Read and validate GGUF files in Python, before llama.cpp ever sees them.

llama.cpp aborts the whole process on some malformed inputs, so the backend checks the header here first:
magic, version, counts that fit the file, every tensor's data inside the file. The same reader serves the
gallery (architecture facts for the memory model) and the quantizer (tensor inventory for plans).
"""

from __future__ import annotations

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
        n = 1
        for d in self.ne:
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


def _field_value(fld: Any) -> Any:
    from gguf import GGUFValueType

    types = list(fld.types)
    if types and types[0] == GGUFValueType.ARRAY:
        if len(fld.data) > _MAX_ARRAY_ITEMS:
            return {"array_len": len(fld.data)}
    return fld.contents()


def read_gguf(path: str | Path) -> GGUFInfo:
    """Parse the header and tensor table of a GGUF file, checking that every tensor lies inside the file.

    Long arrays (token lists, merges) are summarised as `{"array_len": n}` to keep this fast.

    Raises:
        ModelNotFoundError, InvalidGGUFError: see `check_header`; also for unparsable metadata or
            tensors that point past the end of the file (a truncated download).
    """
    version, n_tensors, _ = check_header(path)
    from gguf import GGUFReader  # heavy import, only when a header is really read

    p = Path(path)
    try:
        reader = GGUFReader(os.fspath(p), "r")
    except Exception as exc:  # gguf raises ValueError, struct.error, IndexError... on corrupt input
        raise InvalidGGUFError(p, f"corrupt metadata ({type(exc).__name__}: {exc})") from exc
    size = p.stat().st_size
    try:
        metadata = {name: _field_value(fld) for name, fld in reader.fields.items() if not name.startswith("GGUF.")}
        tensors = tuple(
            TensorInfo(
                name=t.name,
                ne=tuple(int(d) for d in t.shape.tolist()),
                type_name=t.tensor_type.name,
                n_bytes=int(t.n_bytes),
                offset=int(t.data_offset),
            )
            for t in reader.tensors
        )
    except Exception as exc:
        raise InvalidGGUFError(p, f"corrupt tensor table ({type(exc).__name__}: {exc})") from exc
    finally:
        del reader
    if len(tensors) != n_tensors:
        raise InvalidGGUFError(p, f"header declares {n_tensors} tensors, table holds {len(tensors)}")
    for t in tensors:
        if t.offset + t.n_bytes > size:
            raise InvalidGGUFError(
                p, f"truncated: tensor {t.name!r} ends at byte {t.offset + t.n_bytes} but the file has {size} bytes"
            )
    return GGUFInfo(path=os.fspath(p), version=version, metadata=metadata, tensors=tensors, file_size=size)
