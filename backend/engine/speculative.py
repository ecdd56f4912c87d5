"""How much to speculate: draft acceptance per slot, and the draft length k of each batched step.

Every step the scheduler decodes `[y, d1..dk]` for each busy slot in one target batch and keeps drafts only
while they equal the target's own pick (exact-match verification, mtp-engine.md §1.8), so k changes speed,
never output. `DraftController` picks one k for all slots decoding in a step — a recurrent model splits verify
rows of unequal length into separate ubatches — as the k that maximises expected emitted tokens per second:
per-slot acceptance (`Acceptance`) gives the tokens, step costs timed on this machine give the seconds.
llama.cpp's draft-mtp uses a fixed n_max.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..core.errors import InvalidRequestError


@dataclass(frozen=True)
class SpecConfig:
    """Speculation settings: MTP (LocalAI options `spec_n_max`, `spec_n_min`, `spec_p_min`, `spec_adaptive`) and
    n-gram drafting from the request's own tokens (`spec_type` ngram-simple / ngram-mod and their `spec_ngram_*`
    options, llama.cpp's defaults). A slot drafts by n-gram where the n-gram finds a match, else with MTP."""

    n_max: int = 0  # MTP drafts per step; 0: no MTP
    n_min: int = 0  # MTP drafts shorter than this are dropped
    p_min: float = 0.0  # stop drafting when the head's top-1 probability falls below this
    adaptive: bool = True
    ngram: str = ""  # "ngram-simple", "ngram-mod" or "" (none)
    ngram_size_n: int = 12  # ngram-simple: n-gram looked up (spec_ngram_size_n)
    ngram_size_m: int = 48  # ngram-simple: longest draft (spec_ngram_size_m)
    ngram_mod_n_match: int = 24  # ngram-mod: n-gram looked up (spec_ngram_mod_n_match)
    ngram_mod_n_min: int = 48  # ngram-mod: shorter drafts are dropped (spec_ngram_mod_n_min)
    ngram_mod_n_max: int = 64  # ngram-mod: longest draft (spec_ngram_mod_n_max)

    def __post_init__(self) -> None:
        for name in ("ngram_size_n", "ngram_size_m", "ngram_mod_n_match", "ngram_mod_n_max"):
            if not 1 <= getattr(self, name) <= 1024:  # llama.cpp's bounds (common/arg.cpp)
                raise InvalidRequestError(f"{name} must be in 1..1024, not {getattr(self, name)}")
        if not 0 <= self.ngram_mod_n_min <= 1024:
            raise InvalidRequestError(f"ngram_mod_n_min must be in 0..1024, not {self.ngram_mod_n_min}")

    @property
    def ngram_max(self) -> int:
        """The longest n-gram draft (0 without n-gram drafting)."""
        return {"ngram-simple": self.ngram_size_m, "ngram-mod": self.ngram_mod_n_max}.get(self.ngram, 0)

    def n_draft_max(self, model_drafts: bool) -> int:
        """The longest verify draft of any origin (the engine's `n_draft_max`): the rows. `model_drafts`: a model
        (the MTP head or a draft model) drafts up to `n_max`."""
        return max(self.n_max if model_drafts else 0, self.ngram_max)

    def n_rs_seq(self, model_drafts: bool) -> int:
        """How far a recurrent state rolls back in place (the engine's `n_rs_seq`): a model's drafts only. Each
        in-place step back costs every decode a state snapshot (64 of them: -15% on a hybrid model), so a longer
        n-gram row is rolled back from a snapshot taken before it, as llama-server does."""
        return self.n_max if model_drafts else 0


MAX_BACKOFF = 4  # a losing probe halves the probing rate at most this many times (k = 0 probes: every 64..1024 steps)
DRAFT_TOP_K = 10  # llama.cpp's draft sampler: top-10, greedy top-1, p over the 10 (common/speculative.cpp)


NEAR_TOP = 30.0  # logits further than this below the best add < 1e-13 each to its top-10 softmax denominator


def greedy_pick(logits: np.ndarray, p_min: float) -> tuple[int, bool]:
    """A drafter's greedy token from one logits row, and whether its probability over the top 10 is >= p_min
    (how llama.cpp's draft sampler judges a draft for `p_min`, for the MTP head and a draft model alike).

    It runs for every draft token, over the whole vocabulary (248k rows on the Qwen3.5/3.6 models), so it does the
    least that answers: the argmax alone when p_min is 0 (a top-10 partition of 248k logits costs ~0.45 ms, the
    argmax 0.03 ms), else the top 10 among the logits within NEAR_TOP of the best — all of the row's top 10 when
    ten are there; when fewer are, the ones left out change the probability by less than float32 rounding."""
    best = int(np.argmax(logits))
    top = logits[best]
    if not np.isfinite(top):  # a NaN row (argmax finds the NaN) or one all -inf: no draft worth verifying
        return best, False
    if p_min <= 0:
        return best, True
    near = logits[logits >= top - NEAR_TOP]
    vals = np.partition(near, -DRAFT_TOP_K)[-DRAFT_TOP_K:] if len(near) > DRAFT_TOP_K else near
    return best, 1.0 / float(np.exp(vals - top).sum()) >= p_min


@dataclass
class SpecStats:
    """Per-request speculation counters, as llama-server reports them (`draft_n`, `draft_n_accepted`)."""

    drafted: int = 0
    accepted: int = 0
    verify_steps: int = 0
    # (drafted, accepted) per draft origin ("mtp", "draft", "ngram"); the origins a model drafts from are there from the start
    by_origin: dict[str, tuple[int, int]] = field(default_factory=dict)

    def observe(self, k: int, a: int, origin: str = "mtp") -> None:
        if k > 0:
            self.drafted += k
            self.accepted += a
            self.verify_steps += 1
            d, acc = self.by_origin.get(origin, (0, 0))
            self.by_origin[origin] = (d + k, acc + a)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """Tokens emitted per verify step, the bonus token included (vLLM/llama.cpp convention)."""
        return 1.0 + self.accepted / self.verify_steps if self.verify_steps else 0.0

    def as_dict(self) -> dict[str, float]:
        out = {"drafted": self.drafted, "accepted": self.accepted, "verify_steps": self.verify_steps,
               "acceptance_rate": round(self.acceptance_rate, 4),
               "mean_accepted_length": round(self.mean_accepted_length, 3)}
        for origin, (drafted, accepted) in self.by_origin.items():
            out[f"{origin}_drafted"], out[f"{origin}_accepted"] = drafted, accepted
        return out


class Acceptance:
    """One slot's draft acceptance by position: `rate[i]` is an EMA of P(draft i+1 kept | draft i kept).

    Heads get worse with depth, which a single rate would hide; k drafts then emit
    `1 + sum_j prod_{i<j} rate[i]` tokens per step on average (the bonus token included).
    """

    def __init__(self, prior: list[float], decay: float = 0.8) -> None:
        self.rate = list(prior)
        self.decay = decay

    def expected_tokens(self, cap: int) -> list[float]:
        """Expected tokens per step with k = 0..cap drafts (one pass: each k extends the last)."""
        out, p = [1.0], 1.0
        for r in self.rate[:cap]:
            p *= r
            out.append(out[-1] + p)
        return out

    def observe(self, k: int, accepted: int) -> None:
        """One verify: k drafts proposed, `accepted` kept. Positions tried: the kept ones plus the first miss."""
        d = self.decay
        for i in range(min(k, accepted + 1)):
            self.rate[i] = d * self.rate[i] + (1 - d) * (1.0 if i < accepted else 0.0)


class DraftController:
    """Chooses the draft length k shared by the slots decoding in a step, bounded by `n_max`.

    Adaptive mode maximises the expected tokens of all those slots per second of step. The cost of a step
    with n slots and k drafts (k batched MTP decodes plus one verify batch of n(k+1) tokens) is timed on this
    machine: measured (EMA) for the (n, k) tried, a least-squares line in k through the measured k of the same
    n for the others. For each n it first times k = cap, 1 and 0 as anchors, then exploits the best k and
    re-times a neighbour every `explore_every` steps (4x as rarely while k = 0 wins) so estimates stay fresh;
    k = 0 (no drafts) wins when speculation does not pay. It lives with the loaded model, so what it learns
    carries over between requests, and new slots start from the model's running acceptance (`prior`).
    While k = 0 wins the probes back off (4x to 64x as rare), since each pays the drafter's catch-up.
    """

    def __init__(self, n_max: int, *, adaptive: bool = True, decay: float = 0.8, explore_every: int = 16) -> None:
        self.n_max = n_max
        self.adaptive = adaptive
        self.decay = decay
        self.explore_every = explore_every
        self._prior = Acceptance([0.8] * max(n_max, 1), decay)  # optimistic start: try speculation before judging
        self._cost: dict[int, dict[int, float]] = {}  # slots -> {k: EMA seconds of a whole step}
        self._until_probe = explore_every  # steps until the next re-timing of a neighbouring k
        self._lost = 0  # probes in a row after which k = 0 still won
        self._last_won = n_max  # the last k > 0 that was the best

    def new_slot(self) -> Acceptance:
        """Acceptance tracking for a request starting now, from what the model's drafts achieved so far."""
        return Acceptance(self._prior.rate, self.decay)

    @property
    def alpha(self) -> float:
        """Acceptance of the first draft position across requests (the headline rate)."""
        return self._prior.rate[0]

    def choose(self, slots: list[Acceptance], cap: int) -> int:
        """k for the next step of these slots; at most `cap`."""
        cap = max(0, min(self.n_max, cap))
        if not self.adaptive or cap == 0 or not slots:
            return cap
        measured = self._cost.get(len(slots), {})
        for anchor in (cap, 1, 0):
            if anchor not in measured:
                return anchor
        best = self.best_k(slots, cap)
        if best > 0:
            self._lost, self._last_won = 0, best
        self._until_probe -= 1
        if self._until_probe > 0:
            return best
        # Re-time a neighbour now and then. While k = 0 wins, probe 4x as rarely, and half as often again after
        # each probe that did not change that (at most 16 times): a probe also pays the drafter's catch-up with
        # every token decoded without it (the MTP mirror; a draft model decodes them all).
        self._until_probe = self.explore_every if best else self.explore_every * 4 << min(self._lost, MAX_BACKOFF)
        if best == 0:  # probe the k that last won (at first the longest): it measures every position up to it
            self._lost += 1
            return min(self._last_won, cap)
        return best + 1 if best < cap else best - 1

    def best_k(self, slots: list[Acceptance], cap: int) -> int:
        """The k in 0..cap (at most n_max) with the most expected tokens per second for these slots."""
        cap = min(cap, self.n_max)
        tokens = [0.0] * (cap + 1)
        for s in slots:
            for k, t in enumerate(s.expected_tokens(cap)):
                tokens[k] += t
        costs = self.costs(len(slots), cap)
        return max(range(cap + 1), key=lambda k: tokens[k] / costs[k])

    def costs(self, n: int, cap: int) -> list[float]:
        """Seconds per step of n slots with k = 0..cap drafts: measured (EMA) where tried, else a least-squares
        line in k through the measured k of n slots — a step is k MTP decodes plus a verify batch, close to
        linear in k. Runs every step, so the line is fitted once, in closed form (np.polyfit cost ~0.1 ms a k:
        a few percent of a small model's step)."""
        measured = self._cost.get(n, {})
        if all(k in measured for k in range(cap + 1)):
            return [measured[k] for k in range(cap + 1)]
        if len(measured) < 2:
            guess = next(iter(measured.values()), 1.0)
            return [measured.get(k, guess) for k in range(cap + 1)]
        m, sk, st = len(measured), sum(measured), sum(measured.values())
        skk, skt = sum(k * k for k in measured), sum(k * t for k, t in measured.items())
        slope = (m * skt - sk * st) / (m * skk - sk * sk)  # the keys are distinct k, so this is never 0 / 0
        intercept = (st - slope * sk) / m
        return [measured.get(k, max(intercept + slope * k, 1e-9)) for k in range(cap + 1)]

    def observe(self, n: int, k: int, seconds: float) -> None:
        """Feed back one step's wall time: n slots verified k drafts each."""
        measured = self._cost.setdefault(n, {})
        prev = measured.get(k)
        measured[k] = seconds if prev is None else self.decay * prev + (1 - self.decay) * seconds

    def observe_acceptance(self, k: int, accepted: int) -> None:
        """Fold one slot's verify into the model-wide acceptance that new slots start from."""
        self._prior.observe(k, accepted)
