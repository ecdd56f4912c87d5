"""Tier selection: the committed table equals the selector's output; the objectives (quality with a speed floor,
speed with a quality floor) are monotonic in VRAM; placement (full GPU, experts in RAM, CPU), MTP, parallel slots,
context growth, what-if and build-blocked GPUs, explicit wishes and explanations behave as documented."""

from __future__ import annotations

import pytest

from backend.core.errors import EntryNotFoundError, InvalidRequestError
from backend.core.units import GiB
from backend.engine.devices import BuildInfo, Device
from gallery.catalog import load_catalog
from gallery.detect import GPU, HardwareProfile
from gallery.select import OBJECTIVES, Request, budget_for, candidates_for, select
from gallery.table import build_table, class_profile, table_drift

CAT = load_catalog()
POLICY = CAT.policy
MTP_FAMILY = candidates_for(CAT, CAT.get("qwen3.6-35b-a3b-apex-mtp"))
PLAIN_FAMILY = candidates_for(CAT, CAT.get("qwen3.6-35b-a3b-apex"))
FAMILIES = {hub.name: candidates_for(CAT, hub) for hub in CAT.hubs()}
CPU_BUILD = BuildInfo(gpu_offload=True, rpc=True, devices=(Device("CPU", "cpu", "cpu", "CPU", 8 * GiB, 8 * GiB),))


def _gpu(vram_gib: float, ram_gib: float = 64, *, free: float | None = None, source: str = "",
         build: BuildInfo | None = None) -> HardwareProfile:
    gpu = GPU(0, "Test GPU", "nvidia", int(vram_gib * GiB), None if free is None else int(free * GiB), source=source)
    return HardwareProfile("Linux", "cpu", 8, int(ram_gib * GiB), None, (gpu,), build=build)


def _cpu(ram_gib: float) -> HardwareProfile:
    return HardwareProfile("Linux", "cpu", 8, int(ram_gib * GiB), None)


def test_committed_table_matches_the_selector() -> None:
    drift = table_drift(CAT)
    assert drift is None, f"gallery/selection.yaml is stale; run `apexmtp gallery table --write`:\n{drift}"


def test_table_covers_every_family_class_and_objective() -> None:
    table = build_table(CAT)
    assert set(table) == {e.name for e in CAT.hubs()}
    for rows in table.values():
        assert list(rows) == [c["name"] for c in CAT.classes]
        for cls, by_objective in rows.items():
            assert list(by_objective) == list(OBJECTIVES)
            for objective, row in by_objective.items():
                assert row["why"] and (row["fits"] or cls in ("cpu-16g", "apple-16g")), (cls, row)
                assert row["why"].startswith(f"{objective} first") or not row["fits"], row["why"]
                assert row["predicted_tok_s"] > 0 and row["slots"] == 1


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("prefer", OBJECTIVES)
def test_more_vram_never_gives_a_worse_tier_or_a_slower_plan(family: str, prefer: str) -> None:
    """8..80 GiB in 1 GiB steps, the same card otherwise: quality never drops a tier, speed never drops tok/s."""
    order = POLICY.tier_order
    previous = None
    for vram in range(8, 81):
        sel = select(_gpu(vram), FAMILIES[family], POLICY, Request(prefer=prefer))
        assert sel.fits, (vram, sel.explanation)
        if previous is not None:
            if prefer == "quality":
                assert order.index(sel.tier) <= order.index(previous.tier), (vram, previous.tier, sel.tier)
            else:
                assert sel.predicted_tok_s >= previous.predicted_tok_s - 1e-9, (vram, previous, sel)
        previous = sel


def test_quality_takes_the_best_tier_above_the_floor_even_with_experts_in_ram() -> None:
    """At 24 GiB I-Balanced does not fit fully on the GPU, but with 6 layers of experts in RAM it is far above the
    10 tok/s floor, so quality keeps it (the old rule took any fully-on-GPU tier first); speed takes I-Compact."""
    sel = select(_gpu(24), MTP_FAMILY, POLICY)
    assert (sel.tier, sel.mode, sel.objective) == ("I-Balanced", "gpu+ram", "quality") and 0 < sel.n_cpu_moe < 10
    assert sel.predicted_tok_s >= POLICY.objectives.floor_tok_s
    assert sel.device_need <= sel.device_budget == int(22.5 * GiB)
    assert sel.gpu_layers == POLICY.gpu_layers_all and sel.cache_type_k == sel.cache_type_v == "q8_0"
    assert sel.explanation.startswith("quality first (the best tier predicted at >= 10 tok/s): I-Balanced")
    assert "fully on the GPU it would need" in sel.explanation and "predicted ~" in sel.explanation
    fast = select(_gpu(24), MTP_FAMILY, POLICY, Request(prefer="speed"))
    assert (fast.tier, fast.mode, fast.mtp) == ("I-Compact", "gpu", True) and fast.context_size == 262144
    assert fast.options == ["use_jinja:true", "spec_type:draft-mtp", "spec_n_max:6", "spec_p_min:0.75"]
    assert fast.predicted_tok_s > sel.predicted_tok_s and fast.speed.k > 0
    assert fast.explanation.startswith("speed first (the fastest tier at least as good as I-Compact)")
    assert "I-Compact with MTP fully on the GPU" in fast.explanation and "KV @ 256k q8_0" in fast.explanation


def test_a_slow_box_gets_the_fastest_tier_and_is_told_so() -> None:
    sel = select(HardwareProfile("Linux", "cpu", 2, 32 * GiB, None, ram_bandwidth=5e9), PLAIN_FAMILY, POLICY)
    assert sel.fits and sel.predicted_tok_s < POLICY.objectives.floor_tok_s
    assert sel.explanation.startswith("quality first, but no tier reaches 10 tok/s here, so the fastest")
    others = [select(HardwareProfile("Linux", "cpu", 2, 32 * GiB, None, ram_bandwidth=5e9), PLAIN_FAMILY, POLICY,
                     Request(tier=c.tier)) for c in PLAIN_FAMILY]
    assert sel.predicted_tok_s == max(o.predicted_tok_s for o in others if o.fits)


def test_parallel_slots_share_one_kv_buffer_and_the_explanation_counts_them() -> None:
    one = select(_gpu(80), MTP_FAMILY, POLICY, Request(context=32768))
    four = select(_gpu(80), MTP_FAMILY, POLICY, Request(context=32768, parallel=4))
    assert four.breakdown.kv == 4 * one.breakdown.kv and four.breakdown.rs == 4 * one.breakdown.rs
    assert four.breakdown.mtp_kv == 4 * one.breakdown.mtp_kv
    assert "parallel:4" in four.options and "parallel:4" not in one.options
    assert "KV @ 4 slots x 32k q8_0" in four.explanation and four.explanation.endswith("(4 slots x 32k tokens)")
    assert four.row()["slots"] == 4 and four.predicted_tok_s == one.predicted_tok_s  # one client's speed
    # as large as fits counts every slot: 4 slots on a 24 GiB card get a shorter context than one
    auto1, auto4 = (select(_gpu(24), PLAIN_FAMILY, POLICY, Request(parallel=n, prefer="speed")) for n in (1, 4))
    assert auto4.context_size < auto1.context_size and auto4.device_need <= auto4.device_budget
    with pytest.raises(InvalidRequestError, match="parallel must be at least 1"):
        select(_gpu(24), PLAIN_FAMILY, POLICY, Request(parallel=0))
    with pytest.raises(InvalidRequestError, match="prefer must be one of quality, speed"):
        select(_gpu(24), PLAIN_FAMILY, POLICY, Request(prefer="cheap"))


def test_a_gpu_this_build_cannot_use_gets_cpu_plans_and_the_rebuild_command() -> None:
    sel = select(_gpu(24, build=CPU_BUILD), MTP_FAMILY, POLICY)
    assert (sel.mode, sel.gpu_layers, sel.what_if) == ("cpu", 0, False)
    assert sel.build_hint and "-DGGML_CUDA=on" in sel.build_hint and "-DGGML_RPC=on" in sel.build_hint
    assert "--no-cache-dir" in sel.build_hint and sel.build_hint in sel.explanation
    assert "on the CPU (GPU unusable)" in sel.explanation
    assert budget_for(_gpu(24, build=CPU_BUILD), POLICY).blocked.name == "Test GPU"


def test_what_if_gpus_are_planned_on_and_marked() -> None:
    sel = select(_gpu(24, source="override", build=CPU_BUILD), MTP_FAMILY, POLICY)
    assert sel.what_if and sel.mode != "cpu" and sel.build_hint is None
    assert sel.explanation.startswith("what-if, not detected (Test GPU from --vram): quality first")


def test_small_gpu_keeps_experts_in_ram_with_the_fewest_layers() -> None:
    sel = select(_gpu(12, 64), PLAIN_FAMILY, POLICY)
    assert (sel.tier, sel.mode) == ("I-Balanced", "gpu+ram") and 0 < sel.n_cpu_moe < 40
    assert f"n_cpu_moe:{sel.n_cpu_moe}" in sel.options
    one_less = select(_gpu(12, 64), PLAIN_FAMILY, POLICY, Request(context=sel.context_size))
    assert one_less.n_cpu_moe == sel.n_cpu_moe  # the minimum is deterministic
    assert sel.device_need <= sel.device_budget and sel.host_need <= sel.host_budget
    assert f"routed experts of {sel.n_cpu_moe} of 40 layers in RAM" in sel.explanation


def test_mtp_is_kept_only_where_it_is_faster() -> None:
    """With 26 GiB free I-Balanced fits fully on the GPU at 32k only without the MTP head; with it, 2 layers of
    experts go to RAM. The faster of the two is taken, and MTP is never predicted slower than plain decoding."""
    sel = select(_gpu(32, 64, free=26), MTP_FAMILY, POLICY, Request(context=32768))
    plain = select(_gpu(32, 64, free=26), MTP_FAMILY, POLICY, Request(context=32768, mtp=False))
    with_mtp = select(_gpu(32, 64, free=26), MTP_FAMILY, POLICY, Request(context=32768, mtp=True))
    assert (plain.mode, with_mtp.mode) == ("gpu", "gpu+ram") and sel.tier == "I-Balanced"
    assert sel.predicted_tok_s == max(plain.predicted_tok_s, with_mtp.predicted_tok_s)
    assert with_mtp.speed.tok_s >= with_mtp.speed.plain_tok_s
    assert ("spec_type:none" in plain.options) and "(MTP off)" in plain.explanation


def test_cpu_only_and_nothing_fits() -> None:
    sel = select(_cpu(32), PLAIN_FAMILY, POLICY)
    assert (sel.mode, sel.gpu_layers, sel.fits) == ("cpu", 0, True) and "no GPU" in sel.explanation
    tiny = select(_cpu(8), MTP_FAMILY, POLICY)
    assert not tiny.fits and tiny.tier == "I-Nano" and tiny.explanation.startswith("nothing fits")
    four = select(_cpu(8), MTP_FAMILY, POLICY, Request(parallel=4))
    assert "fewer --parallel slots" in four.explanation


def test_context_is_grown_only_when_not_requested() -> None:
    auto = select(_gpu(80), PLAIN_FAMILY, POLICY)
    assert auto.context_size == 262144
    fixed = select(_gpu(80), PLAIN_FAMILY, POLICY, Request(context=8192))
    assert fixed.context_size == 8192 and "context 8k" in fixed.explanation
    with pytest.raises(InvalidRequestError, match="exceeds the model's trained context"):
        select(_gpu(80), PLAIN_FAMILY, POLICY, Request(context=1 << 20))


def test_explicit_tier_and_mtp() -> None:
    sel = select(_gpu(80), MTP_FAMILY, POLICY, Request(tier="i-mini"))
    assert sel.tier == "I-Mini" and sel.mtp
    assert not select(_gpu(80), MTP_FAMILY, POLICY, Request(mtp=False)).mtp
    with pytest.raises(EntryNotFoundError, match="tier 'I-Nano' is not offered"):
        select(_gpu(80), PLAIN_FAMILY, POLICY, Request(tier="I-Nano"))
    with pytest.raises(InvalidRequestError, match="no MTP head"):
        select(_gpu(80), PLAIN_FAMILY, POLICY, Request(mtp=True))


def test_unified_memory_uses_one_pool() -> None:
    mac = class_profile({"name": "mac", "kind": "apple", "ram": "36GiB", "ram_gbps": 150, "description": "Mac"})
    budget = budget_for(mac, POLICY)
    assert budget.unified and budget.gpu_free == int(36 * GiB * 0.75)
    sel = select(mac, MTP_FAMILY, POLICY)
    assert sel.mode == "gpu" and sel.host_need == 0 and "in unified memory" in sel.explanation


def test_detected_free_memory_beats_the_reserve_rule() -> None:
    assert budget_for(_gpu(24, free=10), POLICY).gpu_free == 10 * GiB
    assert budget_for(_gpu(24), POLICY).gpu_free == int(22.5 * GiB)
    profile = HardwareProfile("Linux", "cpu", 8, 64 * GiB, 40 * GiB)
    assert budget_for(profile, POLICY).ram_free == 40 * GiB
