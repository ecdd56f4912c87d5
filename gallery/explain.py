"""Why the selector picked a plan, in words: `Selection.explanation` (and the committed table's `why` column).

Pure wording over the chosen plan (`gallery.plan.Trial`), the memory budget and the typed policy; every figure
comes from the plan `gallery.select` computed, so the sums it shows are the ones that decided.
"""

from __future__ import annotations

from backend.core.units import ctx_label, gib

from .estimate import RunConfig, hosts, summary
from .plan import SPLIT, Budget, Trial
from .policy import Policy


def _slots(run: RunConfig) -> str:
    return f"context {ctx_label(run.n_ctx)}" if run.n_seq == 1 else \
        f"{run.n_seq} slots x {ctx_label(run.n_ctx)} tokens"


def _speed_text(t: Trial, at_context: int) -> str:
    s = t.speed
    mtp = f" with MTP (k={s.k}, {s.mtp_gain:.2f}x plain {s.plain_tok_s:.0f})" if t.run.mtp and s.k else ""
    if t.run.mtp and not s.k:
        mtp = " (MTP predicted not to pay here: plain speed)"
    return (f"predicted ~{s.tok_s:.0f} tok/s decode for one client{mtp} at {ctx_label(min(at_context, t.run.n_ctx))} "
            f"tokens of context ({s.bytes_per_token / 1e9:.2f} GB per token; {s.bandwidth.source})")


def _hosts(t: Trial) -> str:
    n = len(hosts(t.shares))
    return f"{n} hosts" if n > 1 else "1 host"


def _shares_text(t: Trial) -> str:
    """`local RAM 9.1 GiB of 20.0 GiB (13 layers) + RPC0[10.0.0.2:50052] 12.0 GiB of 16.0 GiB (28 layers)`."""
    return " + ".join(f"{s.holder.name} {gib(s.need)} of {gib(s.holder.free)} ({s.layers} layers)"
                      for s in t.shares) + " (margins included)"


def _alone_text(alone: Trial, budget: Budget) -> str:
    """Why a split plan's tier would not fit on this host alone: what `alone`, its first local plan, needs."""
    if alone.placement.mode == "cpu":
        return f"this host alone would need {gib(alone.host_need)} of RAM, {gib(budget.ram_free)} available"
    return f"this host alone would need {gib(alone.device_need)} on the GPU, {gib(budget.gpu_free)} free"


def _why_not(better: tuple[Trial | None, Trial], floor: float) -> str:
    fit, first = better
    tier = first.cand.tier
    if fit is not None:
        return f"{tier} would decode at only ~{fit.speed.tok_s:.0f} tok/s here (below {floor:g})"
    if first.placement.mode == SPLIT:
        over = ", ".join(f"{s.holder.name} {gib(s.need)} of {gib(s.holder.free)}" for s in first.shares if not s.fits)
        return f"{tier} would need {over}"
    if first.placement.mode == "cpu":
        return f"{tier} would need {gib(first.host_need)} of RAM"
    return f"{tier} would need {gib(first.device_need)} on the GPU"


def explain(t: Trial, budget: Budget, policy: Policy, reason: str, first: Trial,
            better: tuple[Trial | None, Trial] | None, *, hint: str | None, alone: Trial | None) -> str:
    """The human reason for picking plan `t`: the objective (`reason`), which tier, where, the sum that fits (or does
    not), the predicted speed, what the next better tier lacked, and a what-if or GPU-build note.

    Args:
        t: the chosen plan (or, when nothing fits, the smallest tier's).
        budget, policy: the memory `t` was planned in, and the policy it was planned with.
        reason: the objective's reason for the pick (`gallery.select`); empty when nothing fits.
        first: the first trial of `t`'s tier (fully on the GPU where there is one), to say what that would need.
        better: (fitting plan or None, first trial) of the next better tier, when the quality objective passed it.
        hint: the GPU-build note, when a detected GPU was left out.
        alone: on a split plan that fits, the tier's first plan on this host alone when it does not fit there
            (None when it would).
    """
    parts = summary(t.breakdown, t.run, t.cand.arch)
    mode = t.placement.mode
    mtp = " with MTP" if t.run.mtp else (" (MTP off)" if t.cand.arch.n_nextn else "")
    if mode == SPLIT and not t.fits:
        fewer = ", fewer --parallel slots" if t.run.n_seq > 1 else ""
        over = ", ".join(s.holder.name for s in t.shares if not s.fits)
        text = (f"nothing fits: even {t.cand.tier} split across {_hosts(t)} needs {_shares_text(t)}, too much for "
                f"{over}; all of it: {parts}; add workers or memory (--mem), pick a tier with --tier to try anyway, "
                f"or a smaller --context{fewer}")
        return text + (f"; {hint}" if hint else "")
    if mode == "cpu" and not t.fits:
        fewer = ", fewer --parallel slots" if t.run.n_seq > 1 else ""
        text = (f"nothing fits: even {t.cand.tier} on the CPU needs {gib(t.host_need)} of RAM ({parts} + "
                f"{gib(policy.host_margin)} margin) and {gib(budget.ram_free)} is available; "
                f"pick a tier with --tier to try anyway, or a smaller --context{fewer}")
        return text + (f"; {hint}" if hint else "")
    if mode == SPLIT:
        if alone is None:
            text = (f"{t.cand.tier}{mtp} split across {_hosts(t)} (it would fit on this host alone too; the workers "
                    f"given are used)")
        else:
            text = f"{t.cand.tier}{mtp} fits only across {_hosts(t)} ({_alone_text(alone, budget)})"
        text += f", by layers in proportion to free memory: {_shares_text(t)}; all of it: {parts}"
    elif mode == "cpu":
        if budget.gpu is None:
            why = "GPU unusable" if budget.blocked else "no GPU"
        else:
            why = f"too large for {budget.gpu_label} even with experts in RAM"
        text = (f"{t.cand.tier}{mtp} on the CPU ({why}): {parts} + {gib(policy.host_margin)} margin = "
                f"{gib(t.host_need)} of {gib(budget.ram_free)} RAM available")
    elif mode == "gpu":
        where = "in unified memory" if budget.unified else "fully on the GPU"
        text = (f"{t.cand.tier}{mtp} {where} ({budget.gpu_label}): {parts} + {gib(policy.margin)} margin = "
                f"{gib(t.device_need)} of {gib(budget.gpu_free)} free")
    else:
        n, total = t.placement.n_cpu_moe, t.cand.arch.n_layer
        text = (f"{t.cand.tier}{mtp} on the GPU ({budget.gpu_label}) with the routed experts of {n} of {total} "
                f"layers in RAM: GPU {gib(t.device_need)} of {gib(budget.gpu_free)} free (margin included), RAM "
                f"{gib(t.host_need)} of {gib(budget.ram_free)}; all of it: {parts}")
        if first.placement.mode == "gpu":
            text += f"; fully on the GPU it would need {gib(first.device_need)}"
    text = f"{reason}: {text}; {_speed_text(t, policy.speed.at_context)}"
    if better is not None:
        text += f"; {_why_not(better, policy.objectives.floor_tok_s)}"
    text += f" ({_slots(t.run)})"
    if budget.what_if:
        given = ([f"{budget.gpu_label} from --vram"] if budget.gpu is not None and budget.gpu.given else []) + \
            ([f"workers {', '.join(gib(d.free) for d in budget.remote if d.given)} from --rpc-mem"]
             if any(d.given for d in budget.remote) else [])
        text = f"what-if, not detected ({'; '.join(given)}): {text}"
    if hint:
        text += f"; {hint}"
    return text
