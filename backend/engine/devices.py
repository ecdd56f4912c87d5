"""What the installed llama.cpp build can run on: its GPU offload support and the devices ggml's registry sees.

Read from the libraries llama-cpp-python ships (`llama_supports_gpu_offload`, `llama_supports_rpc` from libllama;
ggml's device registry through `backend.core.ggml`, the one binding of the ggml llama.cpp loaded).
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

from dataclasses import dataclass

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


def list_devices() -> list[Device]:
    """Every device in ggml's registry now, in registry order (RPC workers included once registered).

    Raises:
        OSError, AttributeError: the llama.cpp libraries are missing or lack the registry API.
    """
    from ..core import ggml

    out = []
    for dev in ggml.local_devices():
        free, total = ggml.memory(dev)
        kind = ggml.device_type(dev)
        out.append(Device(name=ggml.name(dev), description=ggml.description(dev),
                          kind=DEVICE_KINDS[kind] if 0 <= kind < len(DEVICE_KINDS) else f"type{kind}",
                          backend=ggml.backend_name(dev), free=int(free), total=int(total)))
    return out


def build_info() -> BuildInfo:
    """The installed build's offload support and devices (cheap: a few C calls, no backend initialised)."""
    from llama_cpp import llama_cpp as L

    return BuildInfo(gpu_offload=bool(L.llama_supports_gpu_offload()), rpc=bool(L.llama_supports_rpc()),
                     devices=tuple(list_devices()))
