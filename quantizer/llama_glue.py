"""Thin ctypes glue to llama.cpp/ggml that llama-cpp-python does not wrap: log capture, `ggml_tensor` access
from an eval callback. Kept apart so the rest of the quantizer stays plain Python."""

from __future__ import annotations

import ctypes
import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache

import numpy as np

log = logging.getLogger(__name__)
_LOG_LOCK = threading.Lock()
# ggml.h enum ggml_log_level: DEBUG 1, INFO 2, WARN 3, ERROR 4, CONT 5 (continues the previous message)
GGML_LOG_LEVEL_INFO, GGML_LOG_LEVEL_WARN, GGML_LOG_LEVEL_CONT = 2, 3, 5

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
    from pathlib import Path

    import llama_cpp

    # llama-cpp-python ships ggml next to libllama; the loaded copy is reused (same soname).
    libdir = Path(llama_cpp.__file__).parent / "lib"
    lib = ctypes.CDLL(str(min(libdir.glob("libggml-base.so*"), key=lambda p: len(p.name))))
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


@contextmanager
def capture_llama_log(min_level: int = GGML_LOG_LEVEL_WARN) -> Iterator[list[str]]:
    """Collect llama.cpp's log text at `min_level` and above (continuations included) while the block runs.

    The callback is process-global; the previous one is restored afterwards. llama.cpp reports why
    `llama_model_quantize` failed, and what a dry run would write, only through its log.
    """
    import llama_cpp

    captured: list[str] = []
    keep = [False]  # whether the current message (and its continuations) is captured

    @llama_cpp.llama_log_callback
    def _cb(level: int, text: bytes, _user: ctypes.c_void_p) -> None:
        msg = text.decode(errors="replace")
        if level != GGML_LOG_LEVEL_CONT:
            keep[0] = level >= min_level
        if keep[0]:
            captured.append(msg)
        log.debug("llama.cpp: %s", msg.rstrip())

    prev_cb = llama_cpp.llama_log_callback()
    prev_ud = ctypes.c_void_p()
    with _LOG_LOCK:
        llama_cpp.llama_log_get(ctypes.byref(prev_cb), ctypes.byref(prev_ud))
        llama_cpp.llama_log_set(_cb, ctypes.c_void_p(0))
    try:
        yield captured
    finally:
        with _LOG_LOCK:
            llama_cpp.llama_log_set(prev_cb, prev_ud)
