"""Write a GGUF file from metadata, a tensor table and (optionally) the tensors' data: the one writer the
synthetic model (`qwen35moe`) and the synthetic vision projector (`mmproj`) share."""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..core.errors import InvalidRequestError

MetaValue = tuple[Any, ...]  # (GGUFValueType, value) or (GGUFValueType.ARRAY, list, item GGUFValueType)


def tensor_nbytes(ne: Sequence[int], ggml_type: str) -> int:
    """Bytes of a tensor of `ne` elements in `ggml_type`, from ggml's block sizes.

    Raises:
        InvalidRequestError: unknown type, or a row length that is not a multiple of the type's block size.
    """
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    try:
        qtype = GGMLQuantizationType[ggml_type.upper()]
    except KeyError:
        raise InvalidRequestError(f"unknown ggml type {ggml_type!r}") from None
    block, type_size = GGML_QUANT_SIZES[qtype]
    if ne[0] % block:
        raise InvalidRequestError(f"row length {ne[0]} is not a multiple of {qtype.name}'s block size {block}")
    return math.prod(ne) // block * type_size


def write_gguf(
    path: Path,
    metadata: Mapping[str, MetaValue],
    tensors: Sequence[tuple[str, tuple[int, ...], str]],
    data: Callable[[], Iterator[np.ndarray]] | None = None,
) -> Path:
    """Write header, metadata, tensor table, then either the tensors `data()` yields (in order) or holes.

    `metadata["general.architecture"]` names the architecture. The file is written under a `.part` name and
    renamed when complete, so a reader never sees half a file.

    Raises:
        InvalidRequestError: no `general.architecture`, an empty metadata array, a tensor named twice, an unknown
            type, or a row not made of whole blocks (nothing is left on disk).
    """
    from gguf import GGMLQuantizationType, GGUFValueType, GGUFWriter

    if "general.architecture" not in metadata:
        raise InvalidRequestError("metadata has no 'general.architecture'")
    arch = metadata["general.architecture"][1]
    part = path.with_name(path.name + ".part")
    writer = GGUFWriter(part, arch)
    for key, item in metadata.items():
        if key == "general.architecture":
            continue
        vtype, value, *sub = item
        if vtype == GGUFValueType.ARRAY and len(value) == 0:
            raise InvalidRequestError(f"metadata {key!r}: GGUF cannot store an empty array")
        writer.add_key_value(key, list(value) if vtype == GGUFValueType.ARRAY else value, vtype, *sub)
    total = 0
    for name, ne, type_name in tensors:
        nbytes = tensor_nbytes(ne, type_name)
        if any(name in shard for shard in writer.tensors):
            raise InvalidRequestError(f"tensor {name!r} appears twice")
        writer.add_tensor_info(
            name, tuple(reversed(ne)), np.dtype(np.float32), nbytes, GGMLQuantizationType[type_name.upper()]
        )
        total += writer.ggml_pad(nbytes, writer.data_alignment)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        assert writer.fout is not None  # opened by write_header_to_file
        fout = writer.fout[0]
        start = writer.ggml_pad(fout.tell(), writer.data_alignment)
        for array in data() if data is not None else ():
            writer.write_tensor_data(array)
        # Sets the exact size: pads the last tensor, or (no data) leaves the whole data region a hole that
        # takes no disk blocks and reads as zeros.
        fout.truncate(start + total)
        writer.close()
        os.replace(part, path)
    except BaseException:
        writer.close()
        part.unlink(missing_ok=True)
        raise
    return path
