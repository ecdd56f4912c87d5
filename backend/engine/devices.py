"""What the installed llama.cpp build can run on: its GPU offload support and the devices ggml's registry sees.

Read through ctypes from the libraries llama-cpp-python ships (`llama_supports_gpu_offload`, `llama_supports_rpc`
from libllama; `ggml_backend_dev_*` from libggml / libggml-base, signatures as in ggml/include/ggml-backend.h).
Nothing here initialises a backend, so no compute threads or GPU contexts are started; reading a device's memory
is the same query llama.cpp's `--fit` makes (cudaMemGetInfo, Metal's working set, sysinfo for the CPU).

Two facts of llama.cpp that decide how the answers are read:

* `llama_supports_gpu_offload()` is also true when the RPC backend is compiled in (`-DGGML_RPC=on`), even with no
  local GPU, so "this build can use the GPU in this box" is `BuildInfo.local_gpus`, not that flag.
* RPC workers registered with `ggml_backend_rpc_add_server` + `ggml_backend_register` join the same registry
  (device names `RPC<n>`, description = the endpoint, backend `RPC`), so `list_devices()` lists them too, with
  the memory the worker reports; `Device.remote` tells them apart.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

# enum ggml_backend_dev_type (ggml-backend.h), in order.
DEVICE_KINDS = ("cpu", "gpu", "igpu", "accel", "meta")
GPU_KINDS = ("gpu", "igpu")
RPC_BACKEND = "RPC"


@dataclass(frozen=True)
class Device:
    """One ggml device: `name` as llama.cpp logs it (CPU, CUDA0, Vulkan0, Metal, RPC0), the backend that registered
    it (CPU, CUDA, ROCm, Vulkan, Metal, RPC, ...), its kind and memory in bytes."""

    name: str
    description: str
    kind: str  # cpu | gpu | igpu | accel | meta
    backend: str
    free: int
    total: int

    @property
    def remote(self) -> bool:
        """An RPC worker's device (another process or machine)."""
        return self.backend == RPC_BACKEND


@dataclass(frozen=True)
class BuildInfo:
    """What the installed llama.cpp can offload to, as llama.cpp itself reports it."""

    gpu_offload: bool  # llama_supports_gpu_offload(): a GPU/iGPU device, or RPC compiled in
    rpc: bool  # llama_supports_rpc(): built with -DGGML_RPC=on
    devices: tuple[Device, ...]

    @property
    def local_gpus(self) -> tuple[Device, ...]:
        """GPU and iGPU devices in this machine that this build can run layers on."""
        return tuple(d for d in self.devices if d.kind in GPU_KINDS and not d.remote)

    @property
    def remote_devices(self) -> tuple[Device, ...]:
        return tuple(d for d in self.devices if d.remote)

    @property
    def cpu_only(self) -> bool:
        """No device but the CPU (and CPU-side accelerators) to run layers on, here or over RPC."""
        return not self.local_gpus and not self.remote_devices


def _fn(lib: ctypes.CDLL, name: str, restype: Any, argtypes: list[Any]) -> Any:
    fn = getattr(lib, name)
    fn.restype, fn.argtypes = restype, argtypes
    return fn


@lru_cache(maxsize=1)
def _ggml() -> dict[str, Any]:
    """The registry functions, bound once from the libraries next to libllama (LLAMA_CPP_LIB_PATH respected)."""
    from llama_cpp import llama_cpp as L
    from llama_cpp._ctypes_extensions import load_shared_library

    ggml = load_shared_library("ggml", L._base_path)
    base = load_shared_library("ggml-base", L._base_path)
    dev, size_p = ctypes.c_void_p, ctypes.POINTER(ctypes.c_size_t)
    return {
        "count": _fn(ggml, "ggml_backend_dev_count", ctypes.c_size_t, []),
        "get": _fn(ggml, "ggml_backend_dev_get", dev, [ctypes.c_size_t]),
        "name": _fn(base, "ggml_backend_dev_name", ctypes.c_char_p, [dev]),
        "description": _fn(base, "ggml_backend_dev_description", ctypes.c_char_p, [dev]),
        "type": _fn(base, "ggml_backend_dev_type", ctypes.c_int, [dev]),
        "memory": _fn(base, "ggml_backend_dev_memory", None, [dev, size_p, size_p]),
        "reg": _fn(base, "ggml_backend_dev_backend_reg", ctypes.c_void_p, [dev]),
        "reg_name": _fn(base, "ggml_backend_reg_name", ctypes.c_char_p, [ctypes.c_void_p]),
    }


def _text(raw: bytes | None) -> str:
    return raw.decode("utf-8", "replace") if raw else ""


def list_devices() -> list[Device]:
    """Every device in ggml's registry now, in registry order (RPC workers included once registered).

    Raises:
        OSError, AttributeError: the llama.cpp libraries are missing or lack the registry API.
    """
    g = _ggml()
    out = []
    for i in range(g["count"]()):
        dev = g["get"](i)
        free, total = ctypes.c_size_t(0), ctypes.c_size_t(0)
        g["memory"](dev, ctypes.byref(free), ctypes.byref(total))
        kind = g["type"](dev)
        out.append(Device(
            name=_text(g["name"](dev)),
            description=_text(g["description"](dev)),
            kind=DEVICE_KINDS[kind] if 0 <= kind < len(DEVICE_KINDS) else f"type{kind}",
            backend=_text(g["reg_name"](g["reg"](dev))),
            free=int(free.value),
            total=int(total.value),
        ))
    return out


def build_info() -> BuildInfo:
    """The installed build's offload support and devices (cheap: a few C calls, no backend initialised)."""
    from llama_cpp import llama_cpp as L

    return BuildInfo(gpu_offload=bool(L.llama_supports_gpu_offload()), rpc=bool(L.llama_supports_rpc()),
                     devices=tuple(list_devices()))
