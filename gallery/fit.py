"""llama.cpp's `--fit` (LocalAI's `fit_params`, on by default) with our memory model instead of a dry-run load.

A load is fitted to this machine by changing only what it left unset, in llama.cpp's order (common/fit.cpp):
1. nothing, if it fits as asked;
2. the context, when ContextSize is unset: the largest of the policy's automatic contexts (up to the model's
   training context) that fits on the GPU, down to `min_ctx`;
3. the routed experts, when no n_cpu_moe / cpu_moe / override_tensor is given: those of the fewest first layers
   move to system RAM (llama.cpp's `-ot exps=CPU` per layer) until the rest fits the GPU.
Each GPU keeps `target` bytes free (fit_params_target, 1 GiB by default). Without a GPU llama.cpp fits nothing;
nor here (the result says whether the RAM holds the load as asked). Where llama.cpp would finally offload
fewer dense layers (a dense model, or experts already all in RAM), the load stays as asked and the result says
it does not fit: the memory model places whole modes, not single layers.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from backend.core.units import MiB

from .catalog import WeightBytes
from .estimate import ArchFacts, RunConfig, estimate, place
from .plan import Budget
from .policy import Policy
from .select import fewest_cpu_moe, needs


@dataclass(frozen=True)
class FitRequest:
    """A load as configured, and what fitting may change of it."""

    run: RunConfig
    gpu: bool  # layers are asked on a GPU (NGPULayers != 0)
    ctx_free: bool  # ContextSize unset: fitting may choose it
    experts_free: bool  # no expert placement given: fitting may move routed experts to RAM
    min_ctx: int = 4096  # fit_params_min_ctx: the smallest context fitting may choose
    target: int = 1024 * MiB  # fit_params_target: free memory kept on each GPU


@dataclass(frozen=True)
class Fit:
    """What fitting chose: the context, where the model runs, and why."""

    n_ctx: int
    mode: str  # "gpu", "gpu+ram" (the routed experts of the first n_cpu_moe layers in RAM) or "cpu"
    n_cpu_moe: int
    fits: bool
    device_need: int
    host_need: int
    changes: tuple[str, ...]  # what differs from the load as asked, in words (empty: it fits as asked)


def fit(arch: ArchFacts, weights: WeightBytes, budget: Budget, policy: Policy, req: FitRequest) -> Fit:
    """Fit `req` to `budget` (see the module doc)."""
    on_gpu = req.gpu and budget.gpu is not None and budget.gpu_free > 0
    if on_gpu and req.ctx_free:
        for ctx in _contexts(arch, policy, req):
            if (t := _trial(arch, weights, budget, policy, req, ctx, "gpu")).fits:
                return replace(t, changes=(f"context {ctx} (unset: the largest that fits)",))
        # nothing fits whole: the experts are moved at fit_params_min_ctx (the last context tried, unless it
        # exceeds the training context)
        ctx = req.min_ctx
        first = t if t.n_ctx == ctx else _trial(arch, weights, budget, policy, req, ctx, "gpu")
    else:
        ctx = req.run.n_ctx
        first = _trial(arch, weights, budget, policy, req, ctx, "gpu" if on_gpu else "cpu")
        if first.fits or not on_gpu:
            return first
    if req.experts_free and arch.n_expert > 1:
        t = _trial(arch, weights, budget, policy, req, ctx, "gpu+ram")
        if t.fits:
            what = f"routed experts of the first {t.n_cpu_moe} of {arch.n_layer} layers in system RAM"
            return replace(t, changes=(f"context {ctx} (unset: fit_params_min_ctx); {what}" if req.ctx_free
                                       else what,))
    return first


def _contexts(arch: ArchFacts, policy: Policy, req: FitRequest) -> list[int]:
    """The contexts fitting may choose, largest first: the policy's automatic ones within the training context,
    then halvings of the smallest down to `min_ctx`, and `min_ctx`."""
    top = arch.n_ctx_train or max(policy.context_candidates)
    out = sorted({c for c in policy.context_candidates if req.min_ctx <= c <= top}, reverse=True)
    c = (out[-1] if out else top) // 2
    while c > req.min_ctx:
        out.append(c)
        c //= 2
    return [*out, req.min_ctx] if req.min_ctx <= top else [top]


def _trial(arch: ArchFacts, weights: WeightBytes, budget: Budget, policy: Policy, req: FitRequest, n_ctx: int, mode: str) -> Fit:
    run = replace(req.run, n_ctx=n_ctx)
    b = estimate(arch, weights, run)
    n_cpu_moe = fewest_cpu_moe(b, arch, run, budget, req.target) if mode == "gpu+ram" else 0
    p = place(b, mode, n_cpu_moe, arch=arch, n_ubatch=run.n_ubatch)
    device, host, fits = needs(p, budget, req.target, policy.host_margin)
    return Fit(n_ctx, mode, p.n_cpu_moe, fits, device, host, ())
