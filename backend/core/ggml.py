"""The one ctypes binding of ggml that llama-cpp-python does not wrap: the device registry, buffer types, ggml-rpc.

Every caller (the engine's expert offload, device listing, RPC workers and clients, the quantizer's eval callback)
opens ggml through `library`, which picks the very files llama.cpp loaded: the wheel holds copies, not links, of
libX.so, libX.so.0 and libX.so.0.y.z, and opening another copy would load a second ggml with its own registry
and state. llama-cpp-python ships `libggml-rpc.so` only when built with `CMAKE_ARGS="-DGGML_RPC=on"`; without it
`rpc_library` says how to rebuild. Device handles are plain integers (`ggml_backend_dev_t` pointers).
"""

from __future__ import annotations

import ctypes
import functools
import os
import re
from pathlib import Path
from typing import cast

import llama_cpp.llama_cpp as L

from .errors import ModelLoadError

LIB_DIR = Path(L.__file__).parent / "lib"
REBUILD = ('CMAKE_ARGS="-DGGML_RPC=on" .venv/bin/pip install --no-cache-dir --force-reinstall --no-deps '
           "llama-cpp-python==0.3.36")

# enum ggml_backend_dev_type
DEV_CPU, DEV_GPU, DEV_IGPU, DEV_ACCEL = 0, 1, 2, 3

_vp, _sz, _str = ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p
_MEMORY_FN = ctypes.CFUNCTYPE(None, _vp, ctypes.POINTER(_sz), ctypes.POINTER(_sz))
_SIGNATURES = {
    "ggml_backend_dev_count": ([], _sz),
    "ggml_backend_dev_get": ([_sz], _vp),
    "ggml_backend_dev_by_type": ([ctypes.c_int], _vp),
    "ggml_backend_dev_name": ([_vp], _str),
    "ggml_backend_dev_description": ([_vp], _str),
    "ggml_backend_dev_type": ([_vp], ctypes.c_int),
    "ggml_backend_dev_memory": ([_vp, ctypes.POINTER(_sz), ctypes.POINTER(_sz)], None),
    "ggml_backend_dev_backend_reg": ([_vp], _vp),
    "ggml_backend_reg_name": ([_vp], _str),
    "ggml_backend_cpu_buffer_type": ([], _vp),
    "ggml_backend_dev_buffer_type": ([_vp], _vp),
    "ggml_backend_buft_name": ([_vp], _str),
    "ggml_backend_reg_dev_count": ([_vp], _sz),
    "ggml_backend_reg_dev_get": ([_vp, _sz], _vp),
    "ggml_backend_rpc_add_server": ([_str], _vp),
    "ggml_backend_rpc_start_server": ([_str, _str, _sz, _sz, ctypes.POINTER(_vp)], None),
}


def default_threads() -> int:
    """CPU threads ggml computes with when not told otherwise: one per physical core (logical cores when psutil
    cannot tell)."""
    try:
        import psutil

        return max(1, psutil.cpu_count(logical=False) or os.cpu_count() or 1)
    except (ImportError, OSError):  # no psutil, or no /proc or sysfs to count cores from
        return max(1, os.cpu_count() or 1)


def has_rpc() -> bool:
    """Whether this llama-cpp-python was built with the RPC backend."""
    return any(LIB_DIR.glob("libggml-rpc.so*"))


@functools.cache
def library(stem: str) -> ctypes.CDLL:
    """`stem` (libggml, libggml-base, libggml-rpc) as llama.cpp loaded it: the soname file, libX.so.0."""
    found = sorted(LIB_DIR.glob(f"{stem}.so*"), key=lambda p: (not re.fullmatch(r".*\.so\.\d+", p.name), len(p.name)))
    if not found:
        raise ModelLoadError(f"llama-cpp-python has no {stem} ({LIB_DIR}): it was built without the RPC backend; "
                             f"rebuild it with: {REBUILD}")
    lib = ctypes.CDLL(str(found[0]))
    for name, (args, res) in _SIGNATURES.items():
        fn = getattr(lib, name, None)
        if fn is not None:
            fn.argtypes, fn.restype = args, res
    return lib


def backend_name(dev: int) -> str:
    """The backend that registered a device: CPU, CUDA, ROCm, Vulkan, Metal, RPC, ..."""
    reg = _base().ggml_backend_dev_backend_reg(dev)
    return (_base().ggml_backend_reg_name(reg) or b"").decode() if reg else ""


def device_type(dev: int) -> int:
    """enum ggml_backend_dev_type: DEV_CPU, DEV_GPU, DEV_IGPU, DEV_ACCEL (or a newer kind)."""
    return int(_base().ggml_backend_dev_type(dev))


def cpu_buffer_type() -> int:
    """ggml's CPU buffer type (the `--n-cpu-moe` override keeps tensors in it)."""
    return int(_base().ggml_backend_cpu_buffer_type())


def _registry() -> ctypes.CDLL:
    return library("libggml")


def _base() -> ctypes.CDLL:
    return library("libggml-base")


def rpc_library() -> ctypes.CDLL:
    """libggml-rpc. Raises `ModelLoadError` with the rebuild command when this build has none."""
    return library("libggml-rpc")


# ----------------------------------------------------------------------------------------- devices


def name(dev: int) -> str:
    return _base().ggml_backend_dev_name(dev).decode()


def description(dev: int) -> str:
    return _base().ggml_backend_dev_description(dev).decode()


def memory(dev: int) -> tuple[int, int]:
    """(free, total) bytes as the device reports them (the CPU device reports all of RAM as free)."""
    free, total = _sz(), _sz()
    _base().ggml_backend_dev_memory(dev, ctypes.byref(free), ctypes.byref(total))
    return free.value, total.value


def local_devices() -> list[int]:
    """Every device of this process's ggml registry (RPC devices are never registered there)."""
    reg = _registry()
    return [reg.ggml_backend_dev_get(i) for i in range(reg.ggml_backend_dev_count())]


def buffer_types() -> dict[str, int]:
    """Each local device's buffer type by name (CPU, CUDA0, Vulkan0, ...): what `--override-tensor` names."""
    base = _base()
    out = {}
    for dev in local_devices():
        buft = base.ggml_backend_dev_buffer_type(dev)
        if buft:
            out[base.ggml_backend_buft_name(buft).decode()] = int(buft)
    return out


def offload_devices() -> list[int]:
    """The local devices llama.cpp offloads layers to by default: GPUs, else integrated GPUs (llama.cpp's order)."""
    by_type = {t: [d for d in local_devices() if _base().ggml_backend_dev_type(d) == t] for t in (DEV_GPU, DEV_IGPU)}
    return by_type[DEV_GPU] or by_type[DEV_IGPU]


def server_devices() -> list[int]:
    """What a worker exposes, as llama.cpp's rpc-server chooses: every accelerator device, else the CPU."""
    accel = [d for d in local_devices() if _base().ggml_backend_dev_type(d) not in (DEV_CPU, DEV_ACCEL)]
    return accel or [_registry().ggml_backend_dev_by_type(DEV_CPU)]


def add_server(endpoint: str) -> list[int]:
    """Register an RPC endpoint with llama.cpp (idempotent per endpoint) and return its devices.

    llama.cpp connects to `endpoint` here and aborts the process if that fails: pass a `Guard`'s endpoint.
    """
    reg = rpc_library().ggml_backend_rpc_add_server(endpoint.encode())
    if not reg:
        return []
    base = _base()
    return [base.ggml_backend_reg_dev_get(reg, i) for i in range(base.ggml_backend_reg_dev_count(reg))]


def start_server(endpoint: str, cache_dir: str | None, n_threads: int, devices: list[int]) -> None:
    """Serve `devices` over RPC on `endpoint`; blocks for good (returns only when the server could not start)."""
    arr = (_vp * len(devices))(*devices)
    rpc_library().ggml_backend_rpc_start_server(endpoint.encode(), cache_dir.encode() if cache_dir else None,
                                                n_threads, len(devices), arr)


_kept: list[object] = []  # callbacks llama.cpp may call until the process exits


def cap_memory(dev: int, limit: int) -> None:
    """Make `dev` report at most `limit` bytes, free and total, to everyone in this process (a worker's `--mem`).

    ggml has no such setting (rpc-server dropped `--mem`), so this replaces `get_memory` in the device's
    interface table: `struct ggml_backend_device` starts with `struct ggml_backend_device_i`, whose third
    member is `get_memory` (ggml-backend-impl.h of the pinned llama.cpp).
    """
    slot = ctypes.c_void_p.from_address(dev + 2 * ctypes.sizeof(ctypes.c_void_p))
    original = _MEMORY_FN(cast(int, slot.value))

    def capped(d: int, free: ctypes._Pointer, total: ctypes._Pointer) -> None:
        original(d, free, total)
        free[0], total[0] = min(free[0], limit), min(total[0], limit)

    fn = _MEMORY_FN(capped)
    _kept.extend((original, fn))
    slot.value = ctypes.cast(fn, ctypes.c_void_p).value
