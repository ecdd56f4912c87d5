"""Pick a tier and runtime options for a machine, and say why (pure: profile + candidates + policy -> Selection).

Each tier's plan is its fastest placement that fits (hardware-fit.md §0, §6): fully on the GPU, on the GPU with the
routed experts of the first N layers in system RAM (llama.cpp `--n-cpu-moe N`, smallest N that fits), or on the CPU
from RAM; MTP on and off are both tried. Speeds come from `gallery.speed`. Then the objective (`Request.prefer`,
hardware.yaml `policy.objectives`) picks one plan:

* **quality** (default): the best tier whose predicted decode speed meets `floor_tok_s`; if none does, the fastest
  plan. More VRAM never makes a tier's plan slower, so it never gives a worse tier.
* **speed**: the fastest plan among tiers at least as good as `quality_floor` (any tier when none of those fits).
  More VRAM never makes a plan slower or removes one, so it never gives a lower predicted speed.

Memory counts every slot: `Request.parallel` slots of `context` tokens each share one KV buffer. With no context
requested the tier is chosen at `policy.default_context` per slot, then the context grows to the largest candidate
that still fits the same way. Needs always include the margins. A GPU the installed llama.cpp build cannot use is
left out (CPU plans and a reinstall hint); a GPU given with `--vram` is planned on as a what-if.

With RPC workers (`HardwareProfile.workers`, `apexmtp hw --rpc`) every plan is a split across hosts, because the
engine uses the workers it is given (`estimate.split`: layers in proportion to free memory, this host's CPU taking
the first ones when it has no GPU); each holder's share must fit, and the explanation says whether the tier fits
only across hosts. The speed is this host's device's plus `speed.rpc_token_overhead_ms` per worker host. More
worker memory never makes a plan slower (the speed does not depend on the shares), so it never gives a worse tier.

The policy is the catalog's typed one (`gallery.policy.Policy`); the plans are `gallery.plan.Trial`s, and the words
of `Selection.explanation` are `gallery.explain`'s.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from backend.core.errors import EntryNotFoundError, InvalidRequestError
from backend.core.units import GiB

from .builds import can_use, gpu_hint
from .catalog import Catalog, Entry
from .detect import HardwareProfile
from .estimate import ArchFacts, Breakdown, Placement, RunConfig, Share, estimate, hosts, kv_cache_type, place, split
from .explain import explain
from .plan import MODES, SPLIT, Budget, Candidate, Trial
from .policy import Policy
from .speed import Bandwidth, Speed, bandwidth_for, over_rpc, predict

OBJECTIVES = ("quality", "speed")


@dataclass(frozen=True)
class Request:
    """What the user asked for: a context per slot (None = auto), a tier (None = auto), MTP (None = the entry's
    default), the number of parallel slots, and the objective."""

    context: int | None = None
    tier: str | None = None
    mtp: bool | None = None
    parallel: int = 1
    prefer: str = "quality"


@dataclass(frozen=True)
class Selection:
    """The pick: tier, placement and runtime options, the needs behind them, the predicted speed, and why."""

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
    speed: Speed = field(repr=False)
    objective: str = "quality"
    n_seq: int = 1
    what_if: bool = False
    build_hint: str | None = None  # the reinstall command when a detected GPU was left out
    has_mtp_head: bool = False
    base_options: tuple[str, ...] = ()
    shares: tuple[Share, ...] = ()  # a split plan's part on each holder (empty for a plan on this host only)
    rpc_servers: tuple[str, ...] = ()  # the live workers a split plan uses (what-if ones have no address)

    @property
    def predicted_tok_s(self) -> float:
        """Single-client decode tokens/s (with MTP at its best draft length when on)."""
        return self.speed.tok_s

    @property
    def options(self) -> list[str]:
        """`ModelOptions.Options` for our backend: entry defaults, MTP on/off spelled out, expert offload, slots."""
        opts = [o for o in self.base_options if not o.startswith(("spec_", "n_cpu_moe:", "parallel:"))]
        if self.mtp:
            opts += ["spec_type:draft-mtp", f"spec_n_max:{self.spec_n_max}", f"spec_p_min:{self.spec_p_min:g}"]
        elif self.has_mtp_head:
            opts.append("spec_type:none")  # the backend would otherwise enable the head it finds
        if self.n_cpu_moe:
            opts.append(f"n_cpu_moe:{self.n_cpu_moe}")
        if self.n_seq > 1:
            opts.append(f"parallel:{self.n_seq}")
        if self.rpc_servers:
            opts.append(f"rpc_servers:{','.join(self.rpc_servers)}")
        return opts

    def devices(self) -> list[dict[str, Any]]:
        """Each device's part of the plan (GiB; margins in `need_gib`): a split's holders, else the GPU and RAM."""
        if self.shares:
            return [{"device": s.holder.name, "host": s.holder.where, "layers": s.layers,
                     "weights_gib": round(s.weights / GiB, 2), "kv_gib": round(s.kv / GiB, 2),
                     "other_gib": round(s.other / GiB, 2), "need_gib": round(s.need / GiB, 2),
                     "free_gib": round(s.holder.free / GiB, 2), "fits": s.fits} for s in self.shares]
        b = self.breakdown
        moved = b.expert_bytes(self.n_cpu_moe)
        on_host = b.weights if self.mode == "cpu" else b.token_embd + moved
        out = []
        if self.mode != "cpu":
            out.append({"device": "local GPU", "host": "local", "weights_gib": round((b.weights - on_host) / GiB, 2),
                        "kv_gib": round((b.kv + b.mtp_kv) / GiB, 2), "need_gib": round(self.device_need / GiB, 2),
                        "free_gib": round(self.device_budget / GiB, 2), "fits": self.device_need <= self.device_budget})
        if self.host_need:
            out.append({"device": "local RAM", "host": "local", "weights_gib": round(on_host / GiB, 2),
                        "kv_gib": round((b.kv + b.mtp_kv) / GiB if self.mode == "cpu" else 0, 2),
                        "need_gib": round(self.host_need / GiB, 2), "free_gib": round(self.host_budget / GiB, 2),
                        "fits": self.host_need <= self.host_budget})
        return out

    def row(self) -> dict[str, Any]:
        """The selection as a flat, YAML-friendly mapping (one row of the committed table)."""
        return {
            "tier": self.tier,
            "fits": self.fits,
            "placement": self.mode,
            "context": self.context_size,
            "slots": self.n_seq,
            "mtp": self.mtp,
            "n_cpu_moe": self.n_cpu_moe,
            "kv": self.cache_type_k,
            "gpu_need_gib": round(self.device_need / GiB, 2),
            "gpu_free_gib": round(self.device_budget / GiB, 2),
            "ram_need_gib": round(self.host_need / GiB, 2),
            "ram_free_gib": round(self.host_budget / GiB, 2),
            "predicted_tok_s": round(self.speed.tok_s, 1),
            "why": self.explanation,
        }


def budget_for(profile: HardwareProfile, policy: Policy) -> Budget:
    """Usable GPU and RAM: detected free memory, or size minus the policy's reserves when free is unknown. A GPU
    the probed llama.cpp build cannot use gives no GPU budget (it is `blocked`)."""
    reserve = policy.reserve
    ram_free = profile.ram_available
    if ram_free is None:
        ram_free = int(profile.ram_total - reserve.ram_fixed - reserve.ram_fraction * profile.ram_total)
    gpu, remote = profile.best_gpu, profile.workers
    if gpu is None:
        return Budget(None, 0, max(ram_free, 0), False, remote=remote)
    if not can_use(profile.build, gpu):
        return Budget(None, 0, max(ram_free, 0), False, blocked=gpu, remote=remote)
    free = gpu.free
    if free is None and gpu.vendor == "apple":
        band = next(b for b in policy.apple_working_set if gpu.total <= b.up_to)
        free = int(gpu.total * band.fraction)
    elif free is None:
        free = gpu.total - reserve.gpu
    return Budget(gpu, max(free, 0), max(ram_free, 0), gpu.unified, remote=remote)


def candidates_for(catalog: Catalog, entry: Entry) -> list[Candidate]:
    """The tiers `entry` stands for (its variants for a hub entry), best quality first."""
    out = []
    for e in catalog.family_tiers(entry):
        arch = ArchFacts.from_table(catalog.architectures[e.architecture], nextn=e.nextn_predict_layers)
        out.append(Candidate(e.name, e.tier, arch, e.weights, "spec_type:draft-mtp" in e.options, e.options))
    return out



@dataclass(frozen=True)
class _Env:
    """What every trial of one `select` call shares."""

    budget: Budget
    bandwidth: Bandwidth
    policy: Policy
    n_seq: int


def _try(cand: Candidate, mode: str, n_ctx: int, mtp: bool, env: _Env, n_cpu_moe: int | None = None) -> Trial:
    """Estimate `cand` in `mode`; for gpu+ram pick the smallest n_cpu_moe that fits (or use the given one)."""
    policy, budget = env.policy, env.budget
    cache_type = kv_cache_type(policy.cache_type_cpu if mode == "cpu" else policy.cache_type, cand.arch)
    run = RunConfig(n_ctx=n_ctx, n_ubatch=policy.n_ubatch, n_seq=env.n_seq, cache_type_k=cache_type,
                    cache_type_v=cache_type, mtp=mtp, spec_n_max=policy.mtp.spec_n_max if mtp else 0,
                    draft_cache_type=policy.mtp.draft_cache_type, mmproj_bytes=cand.mmproj_bytes,
                    n_checkpoints=policy.ctx_checkpoints, checkpoint_min_step=policy.checkpoint_min_step)
    b = estimate(cand.arch, cand.weights, run)
    if mode == SPLIT:
        return _try_split(cand, run, b, env)
    if mode == "gpu+ram" and n_cpu_moe is None:
        n_cpu_moe = fewest_cpu_moe(b, cand.arch, run, budget, policy.margin)
    p = place(b, mode, n_cpu_moe or 0, arch=cand.arch, n_ubatch=run.n_ubatch)
    device_need, host_need, fits = needs(p, budget, policy.margin, policy.host_margin)
    speed = predict(cand.arch, cand.weights, run, mode, p.n_cpu_moe, env.bandwidth, policy.speed)
    return Trial(cand, run, b, p, device_need, host_need, fits, speed)


def fewest_cpu_moe(b: Breakdown, arch: ArchFacts, run: RunConfig, budget: Budget, margin: int) -> int:
    """The fewest layers whose routed experts must move to system RAM for the rest to fit the GPU (at least 1,
    at most every layer): the GPU's overflow divided by one layer's experts."""
    per_layer = max(b.expert_bytes(1), 1)
    full = place(b, "gpu", arch=arch, n_ubatch=run.n_ubatch).device
    return min(max(1, -(-(full + margin - budget.gpu_free) // per_layer)), arch.n_layer)


def needs(p: Placement, budget: Budget, margin: int, host_margin: int) -> tuple[int, int, bool]:
    """(device bytes, host bytes, whether both fit) of placement `p`, margins included. A unified-memory GPU is one
    pool that must hold everything."""
    if p.mode == "cpu":
        return 0, p.host + host_margin, p.host + host_margin <= budget.ram_free
    if budget.unified:
        device_need = p.device + p.host + margin
        return device_need, 0, 0 < budget.gpu_free and device_need <= budget.gpu_free
    device_need, host_need = p.device + margin, p.host + host_margin
    return device_need, host_need, 0 < budget.gpu_free and device_need <= budget.gpu_free and host_need <= budget.ram_free


def _try_split(cand: Candidate, run: RunConfig, b: Breakdown, env: _Env) -> Trial:
    """`b` split across this host and the workers (`estimate.split`); fits when every holder's share fits."""
    budget, policy = env.budget, env.policy
    shares = split(b, cand.arch, run, budget.holders(policy), tied=cand.weights.output_tied)
    local_gpu = sum(s.need for s in shares if s.holder.where == "local" and s.holder.device)
    local_ram = sum(s.need for s in shares if s.holder.where == "local" and not s.holder.device)
    p = Placement(SPLIT, 0, sum(s.need - s.holder.margin for s in shares if s.holder.device),
                  sum(s.need - s.holder.margin for s in shares if not s.holder.device))
    local_mode = "cpu" if budget.gpu is None else "gpu"
    speed = predict(cand.arch, cand.weights, run, local_mode, 0, env.bandwidth, policy.speed)
    workers = [h for h in hosts(shares) if h != "local"]
    return Trial(cand, run, b, p, local_gpu, local_ram, all(s.fits for s in shares),
                  over_rpc(speed, len(workers), policy.speed), shares)


def _modes(budget: Budget) -> list[str]:
    if budget.remote:
        return [SPLIT]
    if budget.gpu is None:
        return ["cpu"]
    return ["gpu", "cpu"] if budget.unified else list(MODES)


def _mtp_choices(cand: Candidate, request: Request) -> list[bool]:
    if request.mtp and not cand.arch.n_nextn:
        raise InvalidRequestError(f"{cand.name} has no MTP head; drop the MTP request or pick an -MTP build")
    if request.mtp is not None:
        return [request.mtp]
    return [True, False] if cand.mtp_default else [False]


def _fastest(cand: Candidate, n_ctx: int, request: Request, env: _Env) -> tuple[Trial | None, Trial]:
    """(the fastest plan of `cand` that fits, or None; its first trial, the fully-on-GPU one where there is a GPU,
    for explanations)."""
    best: Trial | None = None
    first: Trial | None = None
    for mode in _modes(env.budget):
        for mtp in _mtp_choices(cand, request):
            trial = _try(cand, mode, n_ctx, mtp, env)
            first = first or trial
            if trial.fits and (best is None or trial.speed.tok_s > best.speed.tok_s):
                best = trial
    assert first is not None
    return best, first


def _rank(tier: str, policy: Policy) -> int:
    """Position in the quality order (unknown tiers, e.g. a local file, rank best)."""
    order = policy.tier_order
    return order.index(tier) if tier in order else -1


def _choose(plans: list[tuple[Trial | None, Trial]], prefer: str, policy: Policy) -> tuple[int, str]:
    """Index of the chosen plan (candidates are best quality first) and the objective's reason; -1 = nothing fits."""
    best = {i: trial for i, (trial, _) in enumerate(plans) if trial is not None}
    fitting = list(best)
    if not fitting:
        return -1, ""
    obj = policy.objectives
    floor = obj.floor_tok_s

    def fastest(indices: list[int]) -> int:
        return max(indices, key=lambda i: (best[i].speed.tok_s, -i))  # ties: the better tier

    if prefer == "quality":
        meeting = [i for i in fitting if best[i].speed.tok_s >= floor]
        if meeting:
            return meeting[0], f"quality first (the best tier predicted at >= {floor:g} tok/s)"
        return fastest(fitting), f"quality first, but no tier reaches {floor:g} tok/s here, so the fastest"
    limit = _rank(obj.quality_floor, policy)
    good = [i for i in fitting if _rank(best[i].cand.tier, policy) <= limit]
    if good:
        return fastest(good), f"speed first (the fastest tier at least as good as {obj.quality_floor})"
    return fastest(fitting), f"speed first (no tier as good as {obj.quality_floor} fits, so the fastest)"


def select(profile: HardwareProfile, candidates: list[Candidate], policy: Policy,
           request: Request = Request()) -> Selection:
    """Choose a tier, placement and runtime options for `profile` (see the module doc for the objectives).

    Args:
        profile: detected (or given) hardware.
        candidates: the tiers to choose from, best quality first (`candidates_for`).
        policy: hardware.yaml's `policy` as the catalog holds it (`Catalog.policy`).
        request: explicit context / tier / MTP wishes, parallel slots and the objective.

    Returns:
        The objective's pick; if nothing fits, the smallest tier on the CPU with `fits=False` and an explanation.

    Raises:
        EntryNotFoundError: the requested tier is not among the candidates.
        InvalidRequestError: MTP requested on a file without a head, a context beyond the model's own, fewer than
            one slot, or an unknown objective.
    """
    if request.prefer not in OBJECTIVES:
        raise InvalidRequestError(f"prefer must be one of {', '.join(OBJECTIVES)}, not {request.prefer!r}")
    if request.parallel < 1:
        raise InvalidRequestError(f"parallel must be at least 1, not {request.parallel}")
    if request.tier:
        candidates = [c for c in candidates if c.tier.lower() == request.tier.lower()]
        if not candidates:
            raise EntryNotFoundError(f"tier {request.tier!r} is not offered here")
    if not candidates:
        raise EntryNotFoundError("no candidate tiers to choose from")
    budget = budget_for(profile, policy)
    env = _Env(budget, bandwidth_for(profile, budget.gpu, policy.speed), policy, request.parallel)
    n_ctx = request.context or policy.default_context
    max_ctx = candidates[0].arch.n_ctx_train
    if max_ctx and n_ctx > max_ctx:
        if request.context:
            raise InvalidRequestError(f"context {n_ctx} exceeds the model's trained context {max_ctx}")
        n_ctx = max_ctx
    plans = [_fastest(cand, n_ctx, request, env) for cand in candidates]
    chosen, reason = _choose(plans, request.prefer, policy)
    if chosen < 0:
        fallback = _try(candidates[-1], _modes(budget)[-1], n_ctx, False, env)
        return _selection(fallback, env, request, "", plans[0][1])
    trial = plans[chosen][0]
    assert trial is not None
    if request.context is None:
        trial = _grow_context(trial, env)
    better = plans[chosen - 1] if chosen > 0 and request.prefer == "quality" else None
    return _selection(trial, env, request, reason, plans[chosen][1], better)


def _grow_context(trial: Trial, env: _Env) -> Trial:
    """The same tier, MTP setting and expert placement at the largest candidate context that still fits."""
    max_ctx = trial.cand.arch.n_ctx_train or trial.run.n_ctx
    for ctx in sorted(env.policy.context_candidates, reverse=True):
        if trial.run.n_ctx < ctx <= max_ctx:
            bigger = _try(trial.cand, trial.placement.mode, ctx, trial.run.mtp, env,
                          n_cpu_moe=trial.placement.n_cpu_moe)
            if bigger.fits:
                return bigger
    return trial


def _selection(t: Trial, env: _Env, request: Request, reason: str, first: Trial,
               better: tuple[Trial | None, Trial] | None = None) -> Selection:
    policy, budget = env.policy, env.budget
    mode = t.placement.mode
    hint = gpu_hint(budget.blocked, policy) if budget.blocked is not None else None
    alone = _alone(t, env) if mode == SPLIT and t.fits else None
    return Selection(
        name=t.cand.name,
        tier=t.cand.tier,
        fits=t.fits,
        mode=mode,
        context_size=t.run.n_ctx,
        mtp=t.run.mtp,
        n_cpu_moe=t.placement.n_cpu_moe,
        gpu_layers=_gpu_layers(t, policy),
        cache_type_k=t.run.cache_type_k,
        cache_type_v=t.run.cache_type_v,
        flash_attention=policy.flash_attention,
        spec_n_max=policy.mtp.spec_n_max,
        spec_p_min=policy.mtp.spec_p_min,
        device_need=t.device_need,
        device_budget=budget.gpu_free,
        host_need=t.host_need,
        host_budget=budget.ram_free,
        explanation=explain(t, budget, policy, reason, first, better, hint=hint, alone=alone),
        breakdown=t.breakdown,
        speed=t.speed,
        objective=request.prefer,
        n_seq=env.n_seq,
        what_if=budget.what_if,
        build_hint=hint,
        has_mtp_head=t.cand.arch.n_nextn > 0,
        base_options=t.cand.base_options or policy.default_options,
        shares=t.shares,
        rpc_servers=tuple(dict.fromkeys(d.endpoint for d in budget.remote if not d.given)) if t.shares else (),
    )


def _gpu_layers(t: Trial, policy: Policy) -> int:
    """`n_gpu_layers`: every layer on the GPU; on a split, all but the slots this host's CPU keeps (llama.cpp
    offloads the last n_gpu_layers slots to the devices)."""
    if t.placement.mode == "cpu":
        return 0
    cpu = sum(s.layers for s in t.shares if not s.holder.device)
    return sum(s.layers for s in t.shares) - cpu if cpu else policy.gpu_layers_all


def _alone(t: Trial, env: _Env) -> Trial | None:
    """`t`'s tier on this host without the workers: None when it fits there, else its first (fullest) plan."""
    local = _Env(replace(env.budget, remote=()), env.bandwidth, env.policy, env.n_seq)
    trials = [_try(t.cand, mode, t.run.n_ctx, t.run.mtp, local) for mode in _modes(local.budget)]
    return None if any(trial.fits for trial in trials) else trials[0]
