"""What the selector plans with: the candidate tiers, the memory budget, and one trial placement of a tier.

`gallery.select` makes the trials and picks one; `gallery.explain` words the pick. A plan is placed in one of
`MODES` on this host, or `SPLIT` across it and the RPC workers.
"""

from __future__ import annotations

from dataclasses import dataclass

from .catalog import WeightBytes
from .detect import GPU, RemoteDevice
from .estimate import ArchFacts, Breakdown, Holder, Placement, RunConfig, Share
from .policy import Policy
from .speed import Speed

MODES = ("gpu", "gpu+ram", "cpu")
SPLIT = "split"  # the mode of every plan with RPC workers


@dataclass(frozen=True)
class Candidate:
    """One tier the selector may pick: its facts and whether its options enable MTP by default."""

    name: str
    tier: str
    arch: ArchFacts
    weights: WeightBytes
    mtp_default: bool
    base_options: tuple[str, ...] = ()
    mmproj_bytes: int = 0  # the vision projector loaded beside the weights


@dataclass(frozen=True)
class Budget:
    """Memory the selector may plan with: GPU (0 without one), RAM, and where the numbers came from."""

    gpu: GPU | None
    gpu_free: int
    ram_free: int
    unified: bool
    blocked: GPU | None = None  # a detected GPU the installed llama.cpp cannot use
    remote: tuple[RemoteDevice, ...] = ()  # RPC workers' devices the model is split onto

    @property
    def gpu_label(self) -> str:
        return self.gpu.name if self.gpu else "no GPU"

    @property
    def what_if(self) -> bool:
        return (self.gpu is not None and self.gpu.given) or any(d.given for d in self.remote)

    def holders(self, policy: Policy) -> list[Holder]:
        """Where a split plan may put the model, in the engine's order: this host's RAM (holding the first layers
        when there is no GPU, else only what llama.cpp keeps on the host), the workers' devices, the local GPU
        (one pool with the host's share when unified)."""
        margin, host_margin = policy.margin, policy.host_margin
        workers = [Holder(d.name, d.endpoint, d.free, margin) for d in self.remote]
        if self.gpu is None:
            return [Holder("local RAM", "local", self.ram_free, host_margin, device=False, host=True), *workers]
        gpu = Holder(f"local {self.gpu_label}", "local", self.gpu_free, margin, host=self.unified)
        if self.unified:
            return [*workers, gpu]
        return [Holder("local RAM", "local", self.ram_free, host_margin, device=False, takes_layers=False,
                       host=True), *workers, gpu]



@dataclass(frozen=True)
class Trial:
    """One tier estimated in one placement: its runtime options, memory needs (margins included), fit and speed."""

    cand: Candidate
    run: RunConfig
    breakdown: Breakdown
    placement: Placement
    device_need: int
    host_need: int
    fits: bool
    speed: Speed
    shares: tuple[Share, ...] = ()  # a split's part on each holder
