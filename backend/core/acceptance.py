"""How an MTP head's per-token accuracy maps to the draft acceptance rate llama-server reports.

Drafts are kept while they match the target's own pick, so with a head right on a fraction q of tokens a step of
k drafts accepts `q + q^2 + ... + q^k` on average and the rate accepted/drafted is `(q + ... + q^k) / k`. The
synthetic models (`backend.synth.qwen35moe`) are built to a requested rate with it and the gallery's speed model
(`gallery.speed`) predicts with it, which is why it lives on the ground floor both may import.
"""

from __future__ import annotations


def acceptance_for_accuracy(head_accuracy: float, n_draft: int) -> float:
    """Expected accepted/drafted rate for a head right on a fraction `head_accuracy` of tokens (module doc)."""
    q = head_accuracy
    return sum(q**i for i in range(1, n_draft + 1)) / n_draft


def accuracy_for_acceptance(acceptance: float, n_draft: int) -> float:
    """Inverse of `acceptance_for_accuracy` (monotone in q, solved by bisection)."""
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if acceptance_for_accuracy(mid, n_draft) < acceptance else (lo, mid)
    return (lo + hi) / 2
