"""GPU builds of llama.cpp: whether the installed one can use a GPU, and the exact reinstall command that can.

llama-cpp-python compiles llama.cpp at install time; the GPU backend is a CMake flag (serving-at-scale.md §4), and
pip caches the built wheel under the same name and version, so a rebuild must bypass the cache. The flags per
vendor and the command are data (hardware.yaml `policy.gpu_builds`).
"""

from __future__ import annotations

import logging
import shlex
import sys
from importlib import metadata

from backend.engine.devices import BuildInfo

from .detect import GPU, HardwareProfile
from .policy import Policy

log = logging.getLogger(__name__)


def can_use(build: BuildInfo | None, gpu: GPU) -> bool:
    """Whether plans may put layers on `gpu`: a given (what-if) GPU or an unprobed build are assumed usable;
    otherwise the build must see a local GPU device."""
    return build is None or gpu.given or bool(build.local_gpus)


def reinstall_command(vendor: str, policy: Policy) -> str:
    """The one command that rebuilds llama-cpp-python (same version, this interpreter's pip) for `vendor`'s GPU."""
    builds = policy.gpu_builds
    try:
        version = metadata.version("llama-cpp-python")
    except metadata.PackageNotFoundError:
        version = "0.3.36"
    pip = f"{shlex.quote(sys.executable)} -m pip"
    return builds.command.format(flags=builds.for_vendor(vendor).flags, pip=pip, version=version)


def gpu_hint(gpu: GPU, policy: Policy) -> str:
    """What to tell the owner of a GPU the build cannot use: the backend it needs, the prerequisite, the command."""
    build = policy.gpu_builds.for_vendor(gpu.vendor)
    return (f"the installed llama.cpp cannot use the {gpu.name} (no {build.backend} backend in this build); "
            f"with {build.needs}, rebuild it: {reinstall_command(gpu.vendor, policy)}")


def unusable_gpu(profile: HardwareProfile) -> GPU | None:
    """The best detected GPU when the probed build cannot run layers on it, else None."""
    gpu = profile.best_gpu
    return gpu if gpu is not None and not can_use(profile.build, gpu) else None


def warn_cpu_only_load(n_gpu_layers: int) -> str:
    """The warning for a load that asks for GPU layers on a build without a local GPU: names the GPU found and the
    reinstall command for its vendor (or the generic one), logs it and returns it."""
    from .catalog import load_catalog
    from .detect import detect

    policy = load_catalog().policy
    profile = detect(build=False, bandwidth=False)
    gpu = profile.best_gpu
    if gpu is not None:
        advice = gpu_hint(gpu, policy)
    else:
        advice = ("no GPU was detected either; for a GPU build see the README's install paths, e.g. "
                  + reinstall_command("default", policy))
    message = f"NGPULayers={n_gpu_layers} asked for GPU offload, but this llama.cpp build is CPU-only, so every " \
              f"layer runs on the CPU: {advice}"
    log.warning("%s", message)
    return message
