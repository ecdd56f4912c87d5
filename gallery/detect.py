"""Detect the memory this machine can give a model: GPUs (NVIDIA, AMD, Apple), system RAM, and what the installed
llama.cpp build can run on.

Every probe is optional, time-boxed and never fatal: a missing driver, tool or file becomes a note in the profile,
and the next probe runs. Order: NVML (nvidia-ml-py) -> `nvidia-smi` -> AMD sysfs -> Apple `sysctl`; RAM from psutil
(or /proc/meminfo under a test root) capped by cgroup v2/v1 limits; the build from llama.cpp itself
(`backend.engine.devices`: GPU offload support and ggml's devices); on the live machine, RAM bandwidth from a quick
cached probe (`ram_bandwidth`). Explicit values (`--vram 24GiB`, `--ram 64GiB`, or APEXMTP_VRAM /
APEXMTP_RAM, read by `backend.core.constants`) replace what was detected; a given GPU is a what-if (`GPU.given`).
Paths are read under `root`, so tests feed fake sysfs/proc trees; external tools are found on PATH, so tests put
fake executables there.
"""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

from backend.core import constants
from backend.core.units import GB, GiB, MiB, parse_size
from backend.engine.devices import BuildInfo, build_info

T = TypeVar("T")
PROBE_TIMEOUT_S = 3.0
_SMI_QUERY = "index,uuid,name,memory.total,memory.free"
_NO_LIMIT = 1 << 60  # cgroup v1 writes a huge number for "unlimited"
_PROBE_BYTES = 256 * 1024 * 1024  # well above any L3 cache
_PROBE_VERSION = 2
_PROBE_MAX_AGE_S = 24 * 3600


@dataclass(frozen=True)
class GPU:
    """One accelerator. `free` is what a model may use now (None when unknown: the selector applies its reserve
    rule); `unified` GPUs share system RAM (Apple, AMD APUs, NVIDIA GB10)."""

    index: int
    name: str
    vendor: str
    total: int
    free: int | None
    unified: bool = False
    source: str = ""
    uuid: str = ""
    bandwidth: float | None = None  # bytes/s when known (hardware classes); else looked up by name (gallery.speed)

    @property
    def given(self) -> bool:
        """Sized by `--vram` / APEXMTP_VRAM, not detected: plans for it are what-ifs."""
        return self.source == "override"


@dataclass(frozen=True)
class RemoteDevice:
    """One device of an RPC worker (`apexmtp worker`) the model may be split onto, as the worker reports it.

    `name` is the engine's (`RPC<i>[host:port]`, what Status shows); `given` marks a what-if size (`--rpc-mem`)."""

    endpoint: str
    name: str
    free: int
    total: int
    given: bool = False


@dataclass(frozen=True)
class HardwareProfile:
    """What `detect` found (or was told): OS, CPU, RAM and GPUs, plus one note per probe."""

    system: str
    cpu: str
    cpu_count: int
    ram_total: int
    ram_available: int | None  # None: unknown, the selector subtracts its OS reserve from ram_total
    gpus: tuple[GPU, ...] = ()
    notes: tuple[str, ...] = ()
    overrides: tuple[str, ...] = field(default=())
    build: BuildInfo | None = None  # None: not probed (hardware classes, tests), plans assume a build for the GPU
    ram_bandwidth: float | None = None  # bytes/s, measured on the live machine or given by a hardware class
    workers: tuple[RemoteDevice, ...] = ()  # RPC workers' devices, in the order the engine lists them

    @property
    def best_gpu(self) -> GPU | None:
        """The GPU with the most usable memory (a single device holds the model; multi-GPU split is not planned)."""
        return max(self.gpus, key=lambda g: (g.free if g.free is not None else g.total), default=None)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _bounded(fn: Callable[[], T], timeout: float, notes: list[str], label: str) -> T | None:
    """Run a probe in a daemon thread; a timeout or any exception becomes a note and None."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = fn()
        except Exception as exc:  # noqa: BLE001 - probes must never be fatal
            box["error"] = f"{type(exc).__name__}: {exc}".strip()

    thread = threading.Thread(target=run, name=f"probe-{label}", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        notes.append(f"{label}: timed out after {timeout:g}s")
        return None
    if "error" in box:
        notes.append(f"{label}: {box['error']}")
        return None
    return box.get("value")


def _visible(gpus: list[GPU], spec: str | None) -> list[GPU]:
    """Apply CUDA_VISIBLE_DEVICES (indices or GPU-UUID prefixes; None = unset) to NVIDIA devices."""
    if spec is None:
        return gpus
    wanted = [s.strip() for s in spec.split(",") if s.strip()]
    if not wanted or wanted[0] == "-1":
        return []
    keep = []
    for w in wanted:
        for g in gpus:
            if (w.isdigit() and g.index == int(w)) or (not w.isdigit() and g.uuid.startswith(w)):
                keep.append(g)
    return keep


# ------------------------------------------------------------------------------------------------ NVIDIA


def _nvml() -> list[GPU]:
    import pynvml  # nvidia-ml-py

    pynvml.nvmlInit()
    try:
        gpus = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            name = pynvml.nvmlDeviceGetName(h)
            uuid = pynvml.nvmlDeviceGetUUID(h)
            mem = pynvml.nvmlDeviceGetMemoryInfo(h)
            gpus.append(GPU(i, _text(name), "nvidia", int(mem.total), int(mem.free), source="nvml", uuid=_text(uuid)))
        return gpus
    finally:
        pynvml.nvmlShutdown()


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def parse_nvidia_smi(text: str, ram_total: int) -> list[GPU]:
    """Parse `nvidia-smi --query-gpu=index,uuid,name,memory.total,memory.free --format=csv,noheader,nounits`.

    `[N/A]` memory (GB10/Grace: unified memory reached through ATS) makes a unified GPU sized by system RAM.
    """
    gpus = []
    for line in text.strip().splitlines():
        cols = [c.strip() for c in line.split(",")]
        if len(cols) < 5 or not cols[0].isdigit():
            continue
        index, uuid, name, total, free = cols[:5]
        if total.isdigit():
            gpus.append(GPU(int(index), name, "nvidia", int(total) * MiB, int(free) * MiB if free.isdigit() else None,
                            source="nvidia-smi", uuid=uuid))
        else:
            gpus.append(GPU(int(index), name, "nvidia", ram_total, None, unified=True, source="nvidia-smi", uuid=uuid))
    return gpus


def _nvidia_smi(timeout: float, ram_total: int) -> list[GPU]:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        raise FileNotFoundError("not found on PATH")
    out = subprocess.run([exe, f"--query-gpu={_SMI_QUERY}", "--format=csv,noheader,nounits"],
                         capture_output=True, text=True, timeout=timeout, check=True)
    return parse_nvidia_smi(out.stdout, ram_total)


# --------------------------------------------------------------------------------------------------- AMD


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text().strip(), 0)
    except (OSError, ValueError):
        return None


def _amd_sysfs(root: Path, ram_available: int) -> list[GPU]:
    """AMD GPUs from /sys/class/drm/cardN/device: VRAM and GTT sizes; APUs (small carve-out, large GTT) use GTT,
    which is system RAM, so they count as unified and are capped by available RAM."""
    gpus = []
    drm = root / "sys/class/drm"
    for card in sorted(drm.glob("card*"), key=lambda p: p.name):
        dev = card / "device"
        if not re.fullmatch(r"card\d+", card.name) or _read_int(dev / "vendor") != 0x1002:
            continue
        vram, vram_used = _read_int(dev / "mem_info_vram_total"), _read_int(dev / "mem_info_vram_used") or 0
        gtt, gtt_used = _read_int(dev / "mem_info_gtt_total") or 0, _read_int(dev / "mem_info_gtt_used") or 0
        if vram is None:
            continue
        name = (dev / "product_name").read_text().strip() if (dev / "product_name").is_file() else f"AMD GPU ({card.name})"
        discrete = (dev / "mem_info_vram_vendor").exists()
        apu = not discrete and vram <= 4 * GiB and gtt >= 8 * GiB and gtt >= 4 * vram  # Ollama's rule
        index = int(card.name[4:])
        if apu:
            gpus.append(GPU(index, name, "amd", gtt, min(gtt - gtt_used, ram_available), unified=True, source="sysfs"))
        else:
            gpus.append(GPU(index, name, "amd", vram, vram - vram_used, source="sysfs"))
    return gpus


# ------------------------------------------------------------------------------------------------- Apple


def _sysctl(name: str, timeout: float) -> str:
    exe = shutil.which("sysctl")
    if exe is None:
        raise FileNotFoundError("sysctl not found on PATH")
    return subprocess.run([exe, "-n", name], capture_output=True, text=True, timeout=timeout, check=True).stdout.strip()


def _apple(timeout: float) -> tuple[GPU, str]:
    """The Apple GPU: unified memory of hw.memsize; its budget is Metal's working set when known (an explicit
    iogpu.wired_limit_mb, or recommendedMaxWorkingSetSize via pyobjc), else left to the selector's rule."""
    memsize = int(_sysctl("hw.memsize", timeout))
    cpu = _sysctl("machdep.cpu.brand_string", timeout) or "Apple silicon"
    budget = None
    try:
        wired_mb = int(_sysctl("iogpu.wired_limit_mb", timeout) or 0)
        budget = wired_mb * MiB if wired_mb > 0 else None
    except (OSError, ValueError, subprocess.SubprocessError):
        pass
    if budget is None:
        try:
            import Metal  # pyobjc-framework-metal, optional

            budget = int(Metal.MTLCreateSystemDefaultDevice().recommendedMaxWorkingSetSize())
        except Exception:  # noqa: BLE001 - optional probe
            budget = None
    return GPU(0, cpu, "apple", memsize, budget, unified=True, source="sysctl"), cpu


# --------------------------------------------------------------------------------------------------- RAM


def _meminfo(root: Path) -> tuple[int, int]:
    values = {}
    for line in (root / "proc/meminfo").read_text().splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            values[key] = int(parts[0]) * 1024
    total = values["MemTotal"]
    return total, values.get("MemAvailable", values.get("MemFree", total))


def _ram(root: Path, notes: list[str]) -> tuple[int, int]:
    """(total, available) RAM: psutil on the live system, /proc/meminfo under a test root, then cgroup limits."""
    if root == Path("/"):
        try:
            import psutil

            vm = psutil.virtual_memory()
            total, available = int(vm.total), int(vm.available)
        except ImportError:
            total, available = _meminfo(root)
    else:
        total, available = _meminfo(root)
    limit, usage = _cgroup_limit(root)
    if limit is not None and limit < total:
        notes.append(f"cgroup: memory limited to {limit / GiB:.1f} GiB")
        total, available = limit, min(available, max(limit - (usage or 0), 0))
    return total, available


def _cgroup_limit(root: Path) -> tuple[int | None, int | None]:
    v2 = root / "sys/fs/cgroup/memory.max"
    if v2.is_file():
        text = v2.read_text().strip()
        limit = None if text == "max" else _read_int(v2)
        return limit, _read_int(root / "sys/fs/cgroup/memory.current")
    v1 = root / "sys/fs/cgroup/memory/memory.limit_in_bytes"
    limit = _read_int(v1)
    if limit is None or limit >= _NO_LIMIT:
        return None, None
    return limit, _read_int(root / "sys/fs/cgroup/memory/memory.usage_in_bytes")


def _cpu_name(root: Path, system: str) -> str:
    try:
        for line in (root / "proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or system


# ------------------------------------------------------------------------------------------ RAM bandwidth


def probe_ram_gbps() -> float:
    """Best-of-5 read bandwidth of a float32 matrix-vector product over 256 MiB (GB/s): the access pattern of a
    decode step (every weight streamed once), run by numpy's BLAS on all its threads."""
    import numpy as np

    matrix = np.ones((_PROBE_BYTES // 4096, 1024), dtype=np.float32)
    vector = np.ones(1024, dtype=np.float32)
    matrix @ vector  # page in, start the BLAS threads
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        matrix @ vector
        best = min(best, time.perf_counter() - t0)
    return matrix.nbytes / best / GB


def ram_bandwidth(cpu: str, *, refresh: bool = False) -> float:
    """This machine's RAM read bandwidth in bytes/s (`probe_ram_gbps`, about a second), cached per CPU name and
    core count under APEXMTP_CACHE_DIR. Other processes only ever lower the figure, so the cache keeps the best probe
    seen and probes again (keeping the better figure) once it is a day old or when `refresh` asks."""
    key = f"{cpu}|{os.cpu_count()}|v{_PROBE_VERSION}"
    path = constants.CACHE_DIR / "ram-bandwidth.json"
    best = 0.0
    try:
        cached = json.loads(path.read_text())
        if cached.get("key") == key:
            best = float(cached["gbps"])
            if not refresh and time.time() - float(cached.get("time", 0)) < _PROBE_MAX_AGE_S:
                return best * GB
    except (OSError, ValueError, KeyError, TypeError):
        pass
    # Rounded as the cache keeps it, so the first caller plans with the figure every later one reads.
    gbps = round(max(probe_ram_gbps(), best), 2)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(json.dumps({"key": key, "gbps": gbps, "time": time.time()}))
    os.replace(tmp, path)
    return gbps * GB


# ------------------------------------------------------------------------------------------------ detect


def detect(
    *,
    root: str | Path = "/",
    system: str | None = None,
    vram: str | int | None = None,
    ram: str | int | None = None,
    nvml: bool = True,
    timeout: float = PROBE_TIMEOUT_S,
    build: bool = True,
    bandwidth: bool = True,
) -> HardwareProfile:
    """Probe this machine (never raises for a missing or broken probe).

    Args:
        root: filesystem root for /proc and /sys (tests pass a fake tree).
        system: `platform.system()` value to assume ("Linux", "Darwin", "Windows").
        vram: GPU memory to assume instead of detecting ("24GiB"; 0 = no GPU). Default: APEXMTP_VRAM.
        ram: system RAM to assume ("64GiB"). Default: APEXMTP_RAM.
        nvml: try NVML before nvidia-smi.
        timeout: seconds each probe may take.
        build: ask the installed llama.cpp what it can offload to (off: plans assume a build for the GPU found).
        bandwidth: measure (or read the cached) RAM bandwidth; only on the live machine (`root` "/").

    Raises:
        InvalidRequestError: only for a malformed explicit `vram`/`ram` value.
    """
    root, system = Path(root), system or platform.system()
    notes: list[str] = []
    vram = vram if vram is not None else constants.VRAM_OVERRIDE
    ram = ram if ram is not None else constants.RAM_OVERRIDE
    total, available = _bounded(lambda: _ram(root, notes), timeout, notes, "ram") or (0, 0)
    cpu = _cpu_name(root, system)
    gpus: list[GPU] = []
    if system == "Darwin":
        found = _bounded(lambda: _apple(timeout), timeout * 4, notes, "apple")
        if found:
            gpus, cpu = [found[0]], found[1]
            total = total or found[0].total
    elif vram is None:
        gpus = _detect_linux_gpus(root, constants.CUDA_VISIBLE_DEVICES, nvml, timeout, total, available, notes)
    info = _bounded(build_info, timeout * 4, notes, "llama.cpp build") if build else None
    ram_bw = None
    if bandwidth and root == Path("/"):  # the probe measures this machine, not a test tree
        ram_bw = _bounded(lambda: ram_bandwidth(cpu), timeout * 4, notes, "ram bandwidth")
    profile = HardwareProfile(system, cpu, os.cpu_count() or 1, total, available, tuple(gpus), tuple(notes),
                              build=info, ram_bandwidth=ram_bw)
    return apply_overrides(profile, vram=vram, ram=ram)


def _detect_linux_gpus(root: Path, visible: str | None, nvml: bool, timeout: float, ram_total: int,
                       ram_available: int, notes: list[str]) -> list[GPU]:
    nvidia = _bounded(_nvml, timeout, notes, "nvml") if nvml else None
    if not nvidia:
        nvidia = _bounded(lambda: _nvidia_smi(timeout, ram_total), timeout + 1, notes, "nvidia-smi") or []
    amd = _bounded(lambda: _amd_sysfs(root, ram_available), timeout, notes, "amd-sysfs") or []
    if not nvidia and not amd:
        notes.append("gpu: none found")
    return _visible(nvidia, visible) + amd


def apply_overrides(profile: HardwareProfile, *, vram: str | int | None = None,
                    ram: str | int | None = None) -> HardwareProfile:
    """Replace detected GPUs and/or RAM with explicit sizes (what `--vram` / `--ram` do).

    A given size is what the machine has, like a hardware class: the selector subtracts the same reserves.
    """
    overrides = list(profile.overrides)
    if vram is not None:
        size = parse_size(vram)
        # free=None: a given size is a card's size, so the selector applies the same reserve as for a class
        gpus = (GPU(0, f"{size / GiB:g} GiB GPU (given)", "given", size, None, source="override"),) if size else ()
        profile = replace(profile, gpus=gpus)
        overrides.append(f"vram={size / GiB:g}GiB")
    if ram is not None:
        size = parse_size(ram)
        profile = replace(profile, ram_total=size, ram_available=None)
        overrides.append(f"ram={size / GiB:g}GiB")
    return replace(profile, overrides=tuple(overrides))


def add_workers(profile: HardwareProfile, endpoints: tuple[str, ...] = (),
                sizes: tuple[int, ...] = ()) -> HardwareProfile:
    """`profile` with RPC workers to plan on: live ones (`endpoints`, asked over RPC for each device's memory) and
    what-if ones (`sizes`, one single-device worker each, e.g. from `--rpc-mem 16GiB,16GiB`).

    Raises:
        WorkerUnreachableError: a live worker did not answer (refused, timed out, busy, another protocol version).
    """
    found: list[RemoteDevice] = []
    if endpoints:
        from backend.rpc.client import query_workers

        found = [RemoteDevice(info.endpoint, f"RPC{i}[{info.endpoint}]", d.free, d.total)
                 for info in query_workers(endpoints) for i, d in enumerate(info.devices)]
    found += [RemoteDevice(f"what-if-{n + 1}", f"RPC0[what-if-{n + 1}]", size, size, given=True)
              for n, size in enumerate(sizes)]
    return replace(profile, workers=profile.workers + tuple(found))
