"""The token loop: plain decoding and MTP self-speculative decoding, one code path.

Each step the target decodes `[y, d1..dk]` (k = 0 for plain decoding) in one batch, the request's own sampler
picks a token from every row in turn, and drafts are kept only while they equal the target's pick
(exact-match verification, mtp-engine.md §1.8). Every emitted token is therefore the target's own choice and
the sampler sees exactly the emitted tokens: greedy and seeded output keep the target's distribution.

The draft length k is chosen per step by `DraftController`: fixed, or adaptive — the k that maximises
expected emitted tokens per second, from the live acceptance rate and verify/draft costs timed on this
machine (llama.cpp's draft-mtp uses a fixed n_max).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np

from .engine import Engine
from .sampling import Sampler

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SpecConfig:
    """Speculation settings (LocalAI options `spec_n_max`, `spec_n_min`, `spec_p_min`, `spec_adaptive`)."""

    n_max: int = 0  # 0: plain decoding
    n_min: int = 0  # drafts shorter than this are dropped
    p_min: float = 0.0  # stop drafting when the head's top-1 probability falls below this
    adaptive: bool = True


@dataclass
class SpecStats:
    """Per-request speculation counters, as llama-server reports them (`draft_n`, `draft_n_accepted`)."""

    drafted: int = 0
    accepted: int = 0
    verify_steps: int = 0

    def observe(self, k: int, a: int) -> None:
        if k > 0:
            self.drafted += k
            self.accepted += a
            self.verify_steps += 1

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """Tokens emitted per verify step, the bonus token included (vLLM/llama.cpp convention)."""
        return 1.0 + self.accepted / self.verify_steps if self.verify_steps else 0.0

    def as_dict(self) -> dict[str, float]:
        return {"drafted": self.drafted, "accepted": self.accepted, "verify_steps": self.verify_steps,
                "acceptance_rate": round(self.acceptance_rate, 4),
                "mean_accepted_length": round(self.mean_accepted_length, 3)}


class DraftController:
    """Chooses the draft length k for each step, bounded by `n_max`.

    Adaptive mode maximises expected emitted tokens per second. Acceptance is tracked per draft position
    (`accept[i]`: an EMA of P(draft i+1 kept | draft i kept)), so k drafts emit `1 + sum_j prod_{i<j} accept[i]`
    tokens per step on average (the bonus token included) — heads get worse with depth, which a single rate
    would hide. The cost of a step with k drafts (k MTP decodes plus one
    verify batch of k+1 tokens) is timed on this machine: measured for the k values tried, a least-squares line
    through them for the others. It first times k = n_max, 1 and 0 as anchors, then exploits the best k and
    re-times a neighbour every `explore_every` steps (4x as rarely while k = 0 wins) so estimates stay fresh. k = 0 (no drafts) wins when
    speculation does not pay. It lives with the loaded model, so what it learns carries over between requests.
    """

    def __init__(self, n_max: int, *, adaptive: bool = True, decay: float = 0.8, explore_every: int = 16) -> None:
        self.n_max = n_max
        self.adaptive = adaptive
        self.decay = decay
        self.explore_every = explore_every
        self.accept = [0.8] * max(n_max, 1)  # optimistic start: try speculation before judging it
        self._cost: dict[int, float] = {}  # k -> EMA seconds of a whole step with k drafts
        self._steps = 0

    def choose(self, remaining: int) -> int:
        """k for the next step; never more than `remaining - 1` (the bonus token needs a slot)."""
        cap = max(0, min(self.n_max, remaining - 1))
        if not self.adaptive or cap == 0:
            return cap
        for anchor in (cap, 1, 0):
            if anchor not in self._cost:
                return anchor
        self._steps += 1
        best = self.best_k(cap)
        # Re-time a neighbour now and then; rarely when not speculating, since a probe then also pays the
        # deferred MTP catch-up.
        if self._steps % (self.explore_every * (4 if best == 0 else 1)) == 0:
            return best + 1 if best < cap else best - 1
        return best

    def best_k(self, cap: int) -> int:
        """The k in 0..cap with the highest expected tokens per second under the current estimates."""
        return max(range(cap + 1), key=lambda k: self.expected_tokens(k) / self.cost(k))

    @property
    def alpha(self) -> float:
        """Acceptance of the first draft position (the headline rate)."""
        return self.accept[0]

    def expected_tokens(self, k: int) -> float:
        total, p = 1.0, 1.0
        for i in range(k):
            p *= self.accept[i]
            total += p
        return total

    def cost(self, k: int) -> float:
        """Seconds per step with k drafts: measured (EMA) when k was tried, else a least-squares line through
        the measured k — a step is k MTP decodes plus one verify batch of k+1 tokens, close to linear in k."""
        if k in self._cost:
            return self._cost[k]
        if len(self._cost) < 2:
            return next(iter(self._cost.values()), 1.0)
        ks = np.fromiter(self._cost.keys(), dtype=float)
        ts = np.fromiter(self._cost.values(), dtype=float)
        slope, intercept = np.polyfit(ks, ts, 1)
        return max(float(intercept + slope * k), 1e-9)

    def observe(self, k: int, accepted: int, seconds: float) -> None:
        """Feed back one step: drafts proposed, how many the target kept, and the step's wall time."""
        d = self.decay
        prev = self._cost.get(k)
        self._cost[k] = seconds if prev is None else d * prev + (1 - d) * seconds
        # Positions tried: the accepted ones plus the first rejection (if any).
        for i in range(min(k, accepted + 1)):
            self.accept[i] = d * self.accept[i] + (1 - d) * (1.0 if i < accepted else 0.0)


@dataclass(frozen=True)
class TokenEvent:
    """One emitted token. `extra` holds whatever `inspect` returned for it (logprobs)."""

    token: int
    from_draft: bool
    extra: object = None


Inspect = Callable[[Engine, int, int], object]  # (engine, row index, token) -> per-token extra (e.g. logprobs)


def generate_tokens(
    engine: Engine,
    sampler: Sampler,
    prompt: list[int],
    *,
    max_tokens: int,
    controller: DraftController | None = None,
    n_draft_max: int | None = None,
    spec: SpecConfig = SpecConfig(),
    stats: SpecStats | None = None,
    inspect: Inspect | None = None,
) -> Iterator[TokenEvent]:
    """Yield up to `max_tokens` tokens continuing `prompt`, stopping after an end-of-generation token.

    Args:
        controller: chooses k per step; None or an engine without MTP decodes plainly.
        n_draft_max: per-request cap on k (LocalAI's `NDraft`), at most the engine's n_rs_seq.
        spec: `n_min` and `p_min` of the drafts.
        stats: filled in as the loop runs (drafted, accepted, verify steps).
        inspect: called for each emitted token while its logits row is still valid.

    The engine is consistent whenever this yields, so a consumer may stop at any token.
    """
    stats = stats if stats is not None else SpecStats()
    speculate = controller is not None and engine.mtp_enabled
    cap = engine.config.n_draft_max if n_draft_max is None else min(n_draft_max, engine.config.n_draft_max)
    engine.prefill(prompt)
    sampler.observe_prompt(prompt)
    y = sampler.sample(engine.ctx, -1)
    extra = inspect(engine, -1, y) if inspect else None
    emitted = 0
    while True:
        yield TokenEvent(y, False, extra)
        emitted += 1
        if emitted >= max_tokens or engine.is_eog(y):
            return
        remaining = max_tokens - emitted
        k = min(controller.choose(remaining), cap) if speculate else 0
        t0, m0 = time.perf_counter(), engine.mirror_seconds
        drafts = engine.draft(y, k, spec.p_min) if k > 0 else []
        if len(drafts) < spec.n_min:
            drafts = []
        batch = [y, *drafts]
        engine.decode(batch, logits="all")
        accepted: list[tuple[int, object]] = []
        for i in range(len(batch)):
            tok = sampler.sample(engine.ctx, i)
            accepted.append((tok, inspect(engine, i, tok) if inspect else None))
            if i == len(drafts) or tok != drafts[i] or engine.is_eog(tok):
                break
        n_acc = len(accepted) - 1
        engine.rollback_verify(len(batch), n_acc + 1)
        t2 = time.perf_counter()
        stats.observe(len(drafts), n_acc)
        if speculate:
            # Every kept token is mirrored whatever k is, so mirroring is left out of the per-k cost.
            controller.observe(len(drafts), n_acc, (t2 - t0) - (engine.mirror_seconds - m0))
        for tok, ex in accepted[:-1]:
            yield TokenEvent(tok, True, ex)
            emitted += 1
            if emitted >= max_tokens:
                return
        y, extra = accepted[-1]
