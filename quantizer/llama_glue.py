"""Thin ctypes glue to ggml that llama-cpp-python does not wrap: `ggml_tensor` access from an eval callback.
Kept apart so the rest of the quantizer stays plain Python (llama.cpp's log is read via backend.engine.llamalog)."""

from __future__ import annotations

import ctypes
from functools import lru_cache

import numpy as np

# ggml.h (vendored 0.3.36): GGML_MAX_DIMS 4, GGML_MAX_SRC 10, GGML_MAX_OP_PARAMS 64, GGML_MAX_NAME 64.
_MAX_DIMS, _MAX_SRC, _MAX_OP_PARAMS, _MAX_NAME = 4, 10, 64, 64


class GGMLTensor(ctypes.Structure):
    """`struct ggml_tensor` (ggml.h), read-only view for eval callbacks."""


GGMLTensor._fields_ = [
    ("type", ctypes.c_int),
    ("buffer", ctypes.c_void_p),
    ("ne", ctypes.c_int64 * _MAX_DIMS),
    ("nb", ctypes.c_size_t * _MAX_DIMS),
    ("op", ctypes.c_int),
    ("op_params", ctypes.c_int32 * (_MAX_OP_PARAMS // 4)),
    ("flags", ctypes.c_int32),
    ("src", ctypes.POINTER(GGMLTensor) * _MAX_SRC),
    ("view_src", ctypes.POINTER(GGMLTensor)),
    ("view_offs", ctypes.c_size_t),
    ("data", ctypes.c_void_p),
    ("name", ctypes.c_char * _MAX_NAME),
    ("extra", ctypes.c_void_p),
    ("padding", ctypes.c_char * 8),
]


@lru_cache(maxsize=1)
def _ggml() -> ctypes.CDLL:
    from backend.core.ggml import library

    lib = library("libggml-base")  # the copy llama.cpp loaded, not a second ggml
    lib.ggml_op_name.restype = ctypes.c_char_p
    lib.ggml_op_name.argtypes = [ctypes.c_int]
    lib.ggml_nbytes.restype = ctypes.c_size_t
    lib.ggml_nbytes.argtypes = [ctypes.POINTER(GGMLTensor)]
    lib.ggml_backend_tensor_get.restype = None
    lib.ggml_backend_tensor_get.argtypes = [ctypes.POINTER(GGMLTensor), ctypes.c_void_p, ctypes.c_size_t,
                                            ctypes.c_size_t]
    return lib


@lru_cache(maxsize=1)
def op_ids() -> dict[str, int]:
    """`enum ggml_op` values by name, read from the library itself (the enum changes between versions)."""
    lib, out = _ggml(), {}
    for i in range(256):
        name = lib.ggml_op_name(i)
        if not name:
            break
        out[name.decode()] = i
    return out


def _tensor_array(t: GGMLTensor, dtype: type) -> np.ndarray:
    nbytes = _ggml().ggml_nbytes(ctypes.byref(t))
    buf = np.empty(nbytes, dtype=np.uint8)
    _ggml().ggml_backend_tensor_get(ctypes.byref(t), buf.ctypes.data, 0, nbytes)
    shape = tuple(int(t.ne[i]) for i in (3, 2, 1, 0))
    strides = tuple(int(t.nb[i]) for i in (3, 2, 1, 0))
    return np.lib.stride_tricks.as_strided(buf.view(dtype), shape=shape, strides=strides).copy()


def tensor_f32(t: GGMLTensor) -> np.ndarray:
    """Copy an F32 tensor's data (from any backend) into a numpy array of shape [ne3, ne2, ne1, ne0],
    honouring its byte strides (views are not contiguous)."""
    return _tensor_array(t, np.float32)


def tensor_i32(t: GGMLTensor) -> np.ndarray:
    """Same as `tensor_f32` for an I32 tensor (MoE routing ids)."""
    return _tensor_array(t, np.int32)


def weight_name(t: GGMLTensor) -> str:
    """A weight's GGUF name; the scheduler may rename copies as `BACKEND#name#n` (imatrix.cpp filter_tensor_name)."""
    name = t.name.decode(errors="replace")
    if "#" in name:
        name = name.split("#")[1]
    return name
