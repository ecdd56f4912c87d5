"""Pick a tier and runtime options for a machine, and say why (pure: profile + candidates + policy -> Selection).

Order (hardware-fit.md §0, §6): the best-quality tier that fits entirely on the GPU at the requested context; else
the best tier that fits with the routed experts of the first N layers in system RAM (llama.cpp `--n-cpu-moe N`,
smallest N that fits); else the best tier that runs on the CPU from RAM. Within a tier MTP is tried on first, then
off (quality before speed). With no context requested the tier is chosen at `policy.default_context` and the
context then grows to the largest candidate that still fits the same way. Needs always include the margins.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from backend.errors import EntryNotFoundError, InvalidRequestError

from .catalog import Catalog, Entry, WeightBytes
from .detect import GPU, HardwareProfile
from .estimate import ArchFacts, Breakdown, Placement, RunConfig, estimate, place, summary
from .units import GiB, ctx_label, gib, parse_size

MODES = ("gpu", "gpu+ram", "cpu")


@dataclass(frozen=True)
class Candidate:
    """One tier the selector may pick: its facts and whether its options enable MTP by default."""

    name: str
    tier: str
    arch: ArchFacts
    weights: WeightBytes
    mtp_default: bool
    base_options: tuple[str, ...] = ()


@dataclass(frozen=True)
class Request:
    """What the user asked for: a context (None = auto), a tier (None = auto), MTP (None = the entry's default)."""

    context: int | None = None
    tier: str | None = None
    mtp: bool | None = None


@dataclass(frozen=True)
class Budget:
    """Memory the selector may plan with: GPU (0 without one), RAM, and where the numbers came from."""

    gpu: GPU | None
    gpu_free: int
    ram_free: int
    unified: bool

    @property
    def gpu_label(self) -> str:
        return self.gpu.name if self.gpu else "no GPU"


@dataclass(frozen=True)
class Selection:
    """The pick: tier, placement and runtime options, the needs behind them, and a sentence saying why."""

    name: str
    tier: str
    fits: bool
    mode: str
    context_size: int
    mtp: bool
    n_cpu_moe: int
    gpu_layers: int
    cache_type_k: str
    cache_type_v: str
    flash_attention: str
    spec_n_max: int
    spec_p_min: float
    device_need: int
    device_budget: int
    host_need: int
    host_budget: int
    explanation: str
    breakdown: Breakdown = field(repr=False)
    has_mtp_head: bool = False
    base_options: tuple[str, ...] = ()

    @property
    def options(self) -> list[str]:
        """`ModelOptions.Options` for our backend: entry defaults, MTP on/off spelled out, expert offload."""
        opts = [o for o in self.base_options if not o.startswith(("spec_", "n_cpu_moe:"))]
        if self.mtp:
            opts += ["spec_type:draft-mtp", f"spec_n_max:{self.spec_n_max}", f"spec_p_min:{self.spec_p_min:g}"]
        elif self.has_mtp_head:
            opts.append("spec_type:none")  # the backend would otherwise enable the head it finds
        if self.n_cpu_moe:
            opts.append(f"n_cpu_moe:{self.n_cpu_moe}")
        return opts

    def row(self) -> dict[str, Any]:
        """The selection as a flat, YAML-friendly mapping (one row of the committed table)."""
        return {
            "tier": self.tier,
            "fits": self.fits,
            "placement": self.mode,
            "context": self.context_size,
            "mtp": self.mtp,
            "n_cpu_moe": self.n_cpu_moe,
            "kv": self.cache_type_k,
            "gpu_need_gib": round(self.device_need / GiB, 2),
            "gpu_free_gib": round(self.device_budget / GiB, 2),
            "ram_need_gib": round(self.host_need / GiB, 2),
            "ram_free_gib": round(self.host_budget / GiB, 2),
            "why": self.explanation,
        }


def budget_for(profile: HardwareProfile, policy: dict[str, Any]) -> Budget:
    """Usable GPU and RAM: detected free memory, or size minus the policy's reserves when free is unknown."""
    reserve = policy["reserve"]
    ram_free = profile.ram_available
    if ram_free is None:
        ram_free = int(profile.ram_total - parse_size(reserve["ram_fixed"]) - reserve["ram_fraction"] * profile.ram_total)
    gpu = profile.best_gpu
    if gpu is None:
        return Budget(None, 0, max(ram_free, 0), False)
    free = gpu.free
    if free is None and gpu.vendor == "apple":
        band = next(b for b in policy["apple_working_set"] if gpu.total <= parse_size(b["up_to"]))
        free = int(gpu.total * band["fraction"])
    elif free is None:
        free = gpu.total - parse_size(reserve["gpu"])
    return Budget(gpu, max(free, 0), max(ram_free, 0), gpu.unified)


def candidates_for(catalog: Catalog, entry: Entry) -> list[Candidate]:
    """The tiers `entry` stands for (its variants for a hub entry), best quality first."""
    out = []
    for e in catalog.family_tiers(entry):
        arch = ArchFacts.from_table(catalog.architectures[e.architecture], nextn=e.nextn_predict_layers)
        out.append(Candidate(e.name, e.tier, arch, e.weights, "spec_type:draft-mtp" in e.options, e.options))
    return out


@dataclass(frozen=True)
class _Trial:
    cand: Candidate
    run: RunConfig
    breakdown: Breakdown
    placement: Placement
    device_need: int
    host_need: int
    fits: bool


def _try(cand: Candidate, mode: str, n_ctx: int, mtp: bool, budget: Budget, policy: dict[str, Any],
         n_cpu_moe: int | None = None) -> _Trial:
    """Estimate `cand` in `mode`; for gpu+ram pick the smallest n_cpu_moe that fits (or use the given one)."""
    run = RunConfig(n_ctx=n_ctx, n_ubatch=policy["n_ubatch"], cache_type_k=policy["cache_type"],
                    cache_type_v=policy["cache_type"], mtp=mtp, spec_n_max=policy["mtp"]["spec_n_max"] if mtp else 0,
                    draft_cache_type=policy["mtp"]["draft_cache_type"])
    b = estimate(cand.arch, cand.weights, run)
    margin, host_margin = policy["margin"], policy["host_margin"]
    if mode == "gpu+ram" and n_cpu_moe is None:
        per_layer = max(b.expert_bytes(1), 1)
        full = place(b, "gpu", arch=cand.arch, n_ubatch=run.n_ubatch).device
        n_cpu_moe = min(max(1, -(-(full + margin - budget.gpu_free) // per_layer)), cand.arch.n_layer)
    p = place(b, mode, n_cpu_moe or 0, arch=cand.arch, n_ubatch=run.n_ubatch)
    if mode == "cpu":
        device_need, host_need = 0, p.host + host_margin
        fits = host_need <= budget.ram_free
    elif budget.unified:  # one pool: the GPU budget must hold everything
        device_need, host_need = p.device + p.host + margin, 0
        fits = budget.gpu_free > 0 and device_need <= budget.gpu_free
    else:
        device_need, host_need = p.device + margin, p.host + host_margin
        fits = budget.gpu_free > 0 and device_need <= budget.gpu_free and host_need <= budget.ram_free
    return _Trial(cand, run, b, p, device_need, host_need, fits)


def _modes(budget: Budget) -> list[str]:
    if budget.gpu is None:
        return ["cpu"]
    return ["gpu", "cpu"] if budget.unified else list(MODES)


def _mtp_choices(cand: Candidate, request: Request) -> list[bool]:
    if request.mtp and not cand.arch.n_nextn:
        raise InvalidRequestError(f"{cand.name} has no MTP head; drop the MTP request or pick an -MTP build")
    if request.mtp is not None:
        return [request.mtp]
    return [True, False] if cand.mtp_default else [False]


def select(profile: HardwareProfile, candidates: list[Candidate], policy: dict[str, Any],
           request: Request = Request()) -> Selection:
    """Choose a tier, placement and runtime options for `profile` (see the module doc for the order).

    Args:
        profile: detected (or given) hardware.
        candidates: the tiers to choose from, best quality first (`candidates_for`).
        policy: hardware.yaml's `policy` (margins, context, cache type, MTP tuning, reserves).
        request: explicit context / tier / MTP wishes.

    Returns:
        The first fit; if nothing fits, the smallest tier on the CPU with `fits=False` and an explanation.

    Raises:
        EntryNotFoundError: the requested tier is not among the candidates.
        InvalidRequestError: MTP requested on a file without a head, or a context beyond the model's own.
    """
    if request.tier:
        candidates = [c for c in candidates if c.tier.lower() == request.tier.lower()]
        if not candidates:
            raise EntryNotFoundError(f"tier {request.tier!r} is not offered here")
    if not candidates:
        raise EntryNotFoundError("no candidate tiers to choose from")
    budget = budget_for(profile, policy)
    n_ctx = request.context or policy["default_context"]
    max_ctx = candidates[0].arch.n_ctx_train
    if max_ctx and n_ctx > max_ctx:
        if request.context:
            raise InvalidRequestError(f"context {n_ctx} exceeds the model's trained context {max_ctx}")
        n_ctx = max_ctx
    rejected: list[_Trial] = []
    for mode in _modes(budget):
        for cand in candidates:
            for mtp in _mtp_choices(cand, request):
                trial = _try(cand, mode, n_ctx, mtp, budget, policy)
                if trial.fits:
                    if request.context is None:
                        trial = _grow_context(trial, mode, budget, policy)
                    return _selection(trial, mode, budget, policy, rejected)
                if mode == "gpu" and not rejected:
                    rejected.append(trial)
    smallest = candidates[-1]
    trial = _try(smallest, "cpu", n_ctx, False, budget, policy)
    return _selection(trial, "cpu", budget, policy, rejected)


def _grow_context(trial: _Trial, mode: str, budget: Budget, policy: dict[str, Any]) -> _Trial:
    """The same tier, MTP setting and expert placement at the largest candidate context that still fits."""
    max_ctx = trial.cand.arch.n_ctx_train or trial.run.n_ctx
    for ctx in sorted(policy["context_candidates"], reverse=True):
        if trial.run.n_ctx < ctx <= max_ctx:
            bigger = _try(trial.cand, mode, ctx, trial.run.mtp, budget, policy, n_cpu_moe=trial.placement.n_cpu_moe)
            if bigger.fits:
                return bigger
    return trial


def _selection(t: _Trial, mode: str, budget: Budget, policy: dict[str, Any], rejected: list[_Trial]) -> Selection:
    gpu_layers = policy["gpu_layers_all"] if mode != "cpu" else 0
    return Selection(
        name=t.cand.name,
        tier=t.cand.tier,
        fits=t.fits,
        mode=mode,
        context_size=t.run.n_ctx,
        mtp=t.run.mtp,
        n_cpu_moe=t.placement.n_cpu_moe,
        gpu_layers=gpu_layers,
        cache_type_k=t.run.cache_type_k,
        cache_type_v=t.run.cache_type_v,
        flash_attention=policy["flash_attention"],
        spec_n_max=policy["mtp"]["spec_n_max"],
        spec_p_min=float(policy["mtp"]["spec_p_min"]),
        device_need=t.device_need,
        device_budget=budget.gpu_free,
        host_need=t.host_need,
        host_budget=budget.ram_free,
        explanation=explain(t, mode, budget, policy, rejected),
        breakdown=t.breakdown,
        has_mtp_head=t.cand.arch.n_nextn > 0,
        base_options=t.cand.base_options or tuple(policy["default_options"]),
    )


def explain(t: _Trial, mode: str, budget: Budget, policy: dict[str, Any], rejected: list[_Trial]) -> str:
    """The human reason: which tier, where, the sum that fits (or does not), and what the better tier needed."""
    parts = summary(t.breakdown, t.run, t.cand.arch)
    mtp = " with MTP" if t.run.mtp else (" (MTP off)" if t.cand.arch.n_nextn else "")
    if mode == "cpu" and not t.fits:
        return (f"nothing fits: even {t.cand.tier} on the CPU needs {gib(t.host_need)} of RAM ({parts} + "
                f"{gib(policy['host_margin'])} margin) and {gib(budget.ram_free)} is available; "
                "pick a tier with --tier to try anyway, or a smaller --context")
    if mode == "cpu":
        why = "no GPU" if budget.gpu is None else f"too large for {budget.gpu_label} even with experts in RAM"
        text = (f"{t.cand.tier}{mtp} on the CPU ({why}): {parts} + {gib(policy['host_margin'])} margin = "
                f"{gib(t.host_need)} of {gib(budget.ram_free)} RAM available")
    elif mode == "gpu":
        where = "in unified memory" if budget.unified else "fully on the GPU"
        text = (f"{t.cand.tier}{mtp} {where} ({budget.gpu_label}): {parts} + {gib(policy['margin'])} margin = "
                f"{gib(t.device_need)} of {gib(budget.gpu_free)} free")
    else:
        n, total = t.placement.n_cpu_moe, t.cand.arch.n_layer
        text = (f"{t.cand.tier}{mtp} on the GPU ({budget.gpu_label}) with the routed experts of {n} of {total} "
                f"layers in RAM: GPU {gib(t.device_need)} of {gib(budget.gpu_free)} free (margin included), RAM "
                f"{gib(t.host_need)} of {gib(budget.ram_free)}; all of it: {parts}")
    better = rejected[0] if rejected else None
    if better is not None and better.cand.name != t.cand.name:
        text += f"; {better.cand.tier} would need {gib(better.device_need)} on the GPU"
    elif better is not None and mode != "gpu":
        text += f"; fully on the GPU it would need {gib(better.device_need)}"
    return text + f" (context {ctx_label(t.run.n_ctx)})"
