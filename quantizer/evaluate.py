"""Evaluate tiers against their source on a text: PPL, KL divergence, top-1 agreement, size, MTP acceptance.

The protocol follows llama-perplexity's KL mode (apex-method.md §3.1): the text is cut into `n_ctx` chunks
(first token BOS when the model uses one), both models see the same chunks with an explicit context size, and
only the second half of each chunk is scored, so every scored token has at least n_ctx/2 tokens of context.
KL is KL(source || tier) per scored token, from full-vocabulary softmaxes. MTP acceptance is measured by
running greedy self-speculative generation with a fixed draft length k = 1..4 through the backend's own loop
(the numbers a user of that tier would see), on prompts cut from the same text.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from backend.core.errors import QuantizerError

log = logging.getLogger(__name__)
DATA_DIR = Path(__file__).with_name("data")
DEFAULT_EVAL_TEXT = DATA_DIR / "eval.txt"
DEFAULT_CALIBRATION_TEXT = DATA_DIR / "calibration.txt"


@dataclass
class EvalResult:
    """Numbers for one model against the source (the source itself gives KL 0 and top-1 1.0)."""

    model: str
    tier: str
    size_bytes: int
    n_tokens: int
    ppl: float
    ppl_err: float
    kl_mean: float
    kl_median: float
    kl_p99_9: float
    kl_max: float
    top1: float
    mtp_acceptance: dict[int, float] = field(default_factory=dict)

    @property
    def size_gib(self) -> float:
        return self.size_bytes / 2**30


@dataclass
class _Accumulator:
    nll: list[np.ndarray] = field(default_factory=list)
    kl: list[np.ndarray] = field(default_factory=list)
    same: list[np.ndarray] = field(default_factory=list)

    def add(self, ref_logits: np.ndarray, logits: np.ndarray, targets: np.ndarray) -> None:
        lp_ref, lp = _log_softmax(ref_logits), _log_softmax(logits)
        self.nll.append(-lp[np.arange(len(targets)), targets])
        self.kl.append(np.maximum(0.0, (np.exp(lp_ref) * (lp_ref - lp)).sum(axis=1)))
        self.same.append(ref_logits.argmax(axis=1) == logits.argmax(axis=1))

    def result(self, model: str, tier: str, size: int) -> EvalResult:
        nll, kl, same = (np.concatenate(x) for x in (self.nll, self.kl, self.same))
        ppl = math.exp(float(nll.mean()))
        err = ppl * float(nll.std(ddof=1)) / math.sqrt(len(nll)) if len(nll) > 1 else 0.0
        return EvalResult(model, tier, size, int(len(nll)), ppl, err, float(kl.mean()), float(np.median(kl)),
                          float(np.percentile(kl, 99.9)), float(kl.max()), float(same.mean()))


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(axis=1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=1, keepdims=True))


class _Scorer:
    """One model loaded for full-logit chunk evaluation."""

    def __init__(self, path: str | Path, n_ctx: int, n_threads: int) -> None:
        from backend.engine.llama import Engine, EngineConfig

        self.engine = Engine(path, EngineConfig(n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, n_threads=n_threads))

    def logits(self, chunk: list[int]) -> np.ndarray:
        import llama_cpp.llama_cpp as L

        e = self.engine
        e.reset()
        e.decode_tokens(chunk)
        ptr = L.llama_get_logits(e.ctx)
        return np.ctypeslib.as_array(ptr, shape=(len(chunk), e.n_vocab)).copy()

    def close(self) -> None:
        self.engine.close()


def mtp_acceptance(path: str | Path, prompts: Sequence[list[int]], ks: Sequence[int] = (1, 2, 3, 4),
                   max_tokens: int = 48, n_threads: int = 0) -> dict[int, float]:
    """Accepted/drafted of greedy MTP self-speculation with a fixed draft length k, for each k.

    Empty when the model has no MTP head.
    """
    from backend.core.gguf_file import read_gguf
    from backend.engine.generation import GenerationRequest
    from backend.engine.llama import Engine, EngineConfig
    from backend.engine.scheduler import Scheduler, collect
    from backend.engine.speculative import SpecConfig

    if not read_gguf(path).has_mtp_head:
        return {}
    out: dict[int, float] = {}
    n_ctx = max(len(p) for p in prompts) + max_tokens + 8
    for k in ks:
        engine = Engine(path, EngineConfig(n_ctx=n_ctx, n_threads=n_threads, mtp=True, n_draft_max=k))
        scheduler = Scheduler(engine, SpecConfig(n_max=k, adaptive=False))
        try:
            drafted = accepted = 0
            for prompt in prompts:
                engine.reset()
                stats = collect(scheduler, GenerationRequest(prompt=prompt, max_tokens=max_tokens)).stats
                drafted, accepted = drafted + stats.drafted, accepted + stats.accepted
            out[k] = accepted / drafted if drafted else 0.0
        finally:
            scheduler.close()
    return out


def evaluate(
    source: str | Path,
    candidates: Sequence[str | Path],
    text: str,
    *,
    n_ctx: int = 512,
    n_chunks: int | None = None,
    mtp_ks: Sequence[int] = (1, 2, 3, 4),
    mtp_prompts: int = 4,
    n_threads: int = 0,
    progress: Callable[[str], None] | None = None,
) -> list[EvalResult]:
    """Evaluate each candidate GGUF against `source` on `text` (see the module docstring).

    Pass the source itself among the candidates to get its own PPL (and a KL-0 sanity row).

    Raises:
        QuantizerError: the text is shorter than one chunk, or a candidate's vocabulary differs.
    """
    from .imatrix import text_chunks

    ref = _Scorer(source, n_ctx, n_threads)
    results = []
    try:
        chunks = text_chunks(ref.engine, text, n_ctx, n_chunks)
        first = n_ctx // 2
        prompts = [c[:64] for c in chunks[:mtp_prompts]]
        for cand in candidates:
            acc = _Accumulator()
            scorer = ref if Path(cand).resolve() == Path(source).resolve() else _Scorer(cand, n_ctx, n_threads)
            try:
                if scorer.engine.n_vocab != ref.engine.n_vocab:
                    raise QuantizerError(f"{cand}: vocabulary of {scorer.engine.n_vocab} tokens, source has "
                                         f"{ref.engine.n_vocab}: not the same model")
                for chunk in chunks:
                    base = ref.logits(chunk)[first:-1]
                    logits = base if scorer is ref else scorer.logits(chunk)[first:-1]
                    acc.add(base, logits, np.asarray(chunk[first + 1:]))
                tier = "source" if scorer is ref else _tier_of(cand, scorer.engine.meta("apexmtp.tier"))
            finally:
                if scorer is not ref:
                    scorer.close()
            res = acc.result(str(cand), tier, Path(cand).stat().st_size)
            if mtp_ks:
                res.mtp_acceptance = mtp_acceptance(cand, prompts, mtp_ks, n_threads=n_threads)
            results.append(res)
            if progress:
                progress(f"{res.tier}: PPL {res.ppl:.4f}, KL {res.kl_mean:.5f}")
    finally:
        ref.close()
    return results


def _tier_of(path: str | Path, tier_key: str | None) -> str:
    """Tier label of a candidate: its `apexmtp.tier` key, else the name after `-APEX-`, else the file name."""
    if tier_key:
        return tier_key
    name = Path(path).name.removesuffix(".gguf")
    return name.split("-APEX-", 1)[1].removeprefix("MTP-") if "-APEX-" in name else name


def to_json(results: Sequence[EvalResult], path: str | Path, meta: dict[str, object]) -> Path:
    """Write results as JSON `{"meta": {...}, "results": [...]}`, keys as in APEX's benchmark JSON where possible."""
    rows = [{**asdict(r), "size_gib": round(r.size_gib, 4),
             "mtp_acceptance": {str(k): round(v, 4) for k, v in r.mtp_acceptance.items()}} for r in results]
    p = Path(path)
    p.write_text(json.dumps({"meta": meta, "results": rows}, indent=2) + "\n")
    return p


def load_json(path: str | Path) -> list[EvalResult]:
    """Read results written by `to_json`."""
    data = json.loads(Path(path).read_text())
    out = []
    for row in data["results"]:
        row = {k: v for k, v in row.items() if k != "size_gib"}
        row["mtp_acceptance"] = {int(k): float(v) for k, v in row.get("mtp_acceptance", {}).items()}
        out.append(EvalResult(**row))
    return out


def table(results: Sequence[EvalResult]) -> str:
    """A Markdown table of the results, smallest KL first after the source."""
    ks = sorted({k for r in results for k in r.mtp_acceptance})
    head = ["Tier", "Size (MiB)", "PPL", "KL mean", "KL median", "KL p99.9", "KL max", "Top-1"]
    head += [f"MTP acc k={k}" for k in ks]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in sorted(results, key=lambda r: (r.tier != "source", r.kl_mean)):
        cells = [r.tier, f"{r.size_bytes / 2**20:.2f}", f"{r.ppl:.4f} ± {r.ppl_err:.4f}", f"{r.kl_mean:.5f}",
                 f"{r.kl_median:.5f}", f"{r.kl_p99_9:.4f}", f"{r.kl_max:.4f}", f"{100 * r.top1:.2f}%"]
        cells += [f"{100 * r.mtp_acceptance[k]:.1f}%" if k in r.mtp_acceptance else "-" for k in ks]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(results: Sequence[EvalResult], path: str | Path, title: str = "") -> Path:
    """PNG of mean KL divergence against file size across tiers (log KL axis). Needs the `plot` extra.

    Raises:
        QuantizerError: matplotlib is not installed.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise QuantizerError("plotting needs matplotlib: pip install 'apexmtp[plot]'") from exc
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    pts = [r for r in results if r.tier != "source"]
    # Plain and I- tiers share sizes; one line each keeps the imatrix gain readable.
    for label, marker, group in (("with imatrix (I-)", "o-", [r for r in pts if r.tier.startswith("I-")]),
                                 ("without imatrix", "s--", [r for r in pts if not r.tier.startswith("I-")])):
        group = sorted(group, key=lambda r: r.size_bytes)
        if not group:
            continue
        xs = [r.size_bytes / 2**20 for r in group]
        ys = [max(r.kl_mean, 1e-6) for r in group]
        ax.plot(xs, ys, marker, label=label)
        for r, x, y in zip(group, xs, ys, strict=True):
            ax.annotate(r.tier, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.legend(fontsize=8)
    ax.set_yscale("log")
    ax.set_xlabel("file size (MiB)")
    ax.set_ylabel("mean KL divergence vs source")
    ax.set_title(title or "KL divergence vs size")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    p = Path(path)
    fig.savefig(p)
    plt.close(fig)
    return p
