"""The selection policy (hardware.yaml `policy:`) as typed, frozen data.

`gallery.schema.validate_hardware` checks the YAML and builds one `Policy` when the catalog loads
(`Catalog.policy`); the selector (`gallery.select`), its explanations (`gallery.explain`), the speed model
(`gallery.speed`) and the GPU-build advice (`gallery.builds`) read its attributes. Sizes are bytes. hardware.yaml's
comments say where each figure comes from.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class MtpPolicy:
    """LocalAI's tuning for draft-mtp entries: draft length, draft acceptance threshold, the MTP context's KV type."""

    spec_n_max: int
    spec_p_min: float
    draft_cache_type: str


@dataclass(frozen=True)
class Reserve:
    """How a hardware class's size becomes free memory: a GPU keeps `gpu` bytes, RAM `ram_fixed` + a fraction."""

    gpu: int
    ram_fixed: int
    ram_fraction: float


@dataclass(frozen=True)
class AppleBand:
    """Metal's working set on Apple GPUs with at most `up_to` bytes of memory: this fraction of it."""

    up_to: int
    fraction: float


@dataclass(frozen=True)
class Objectives:
    """`--prefer quality`: the best tier at `floor_tok_s` or faster; `--prefer speed`: the fastest tier at least as
    good as `quality_floor`."""

    floor_tok_s: float
    quality_floor: str


@dataclass(frozen=True)
class DeviceSpeed:
    """The speed model's constants for one device kind (gallery.speed documents them)."""

    efficiency: float
    layer_overhead_ms: float
    verify_overhead: float
    quant_cost: float


@dataclass(frozen=True)
class Acceptance:
    """The MTP head's acceptance rate (accepted/drafted) at `n_draft` drafts per step."""

    rate: float
    n_draft: int


@dataclass(frozen=True)
class GpuBandwidth:
    """A datasheet bandwidth (GB/s) for GPUs whose name matches the regular expression `match`."""

    match: str
    gbps: float


@dataclass(frozen=True)
class SpeedPolicy:
    """The speed model's constants (`policy.speed`; gallery.speed documents the model)."""

    at_context: int
    token_overhead_ms: float
    rpc_token_overhead_ms: float
    devices: Mapping[str, DeviceSpeed]  # by device kind: gpu, unified, cpu
    mtp_acceptance: Acceptance
    ram_gbps: float
    gpu_gbps: tuple[GpuBandwidth, ...]  # first match wins
    vendor_gbps: Mapping[str, float]  # by GPU vendor, with a `default`

    def vendor_bandwidth(self, vendor: str) -> float:
        """The GB/s assumed for a GPU of `vendor` that no datasheet row names."""
        return self.vendor_gbps.get(vendor, self.vendor_gbps["default"])


@dataclass(frozen=True)
class GpuBuild:
    """One vendor's llama.cpp GPU build: its CMake flags, the backend's name and what the build needs installed."""

    flags: str
    backend: str
    needs: str


@dataclass(frozen=True)
class GpuBuilds:
    """The reinstall command (with `{flags}`, `{pip}`, `{version}`) and the build of each GPU vendor."""

    command: str
    vendors: Mapping[str, GpuBuild]  # with a `default`

    def for_vendor(self, vendor: str) -> GpuBuild:
        """`vendor`'s build, else the default one."""
        return self.vendors.get(vendor, self.vendors["default"])


@dataclass(frozen=True)
class Policy:
    """hardware.yaml's `policy`: tier order, margins, context, runtime defaults, reserves, objectives, speed, builds."""

    tier_order: tuple[str, ...]  # best quality first
    margin: int  # kept free on the device that holds the model
    host_margin: int  # kept free in system RAM
    default_context: int  # the context per slot a tier must fit at when none is asked for
    n_ubatch: int
    n_batch: int
    gpu_layers_all: int  # n_gpu_layers meaning "every layer"
    checkpoint_min_step: int
    ctx_checkpoints: int
    context_candidates: tuple[int, ...]  # the contexts an automatic one grows to
    cache_type: str  # KV cache type where the KV sits on a GPU
    cache_type_cpu: str  # ... and where it sits in system RAM (CPU-only plans)
    flash_attention: str
    mtp: MtpPolicy
    default_options: tuple[str, ...]
    reserve: Reserve
    apple_working_set: tuple[AppleBand, ...]  # smallest `up_to` first
    objectives: Objectives
    speed: SpeedPolicy
    gpu_builds: GpuBuilds
