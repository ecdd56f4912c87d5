"""Tier selection: the committed table equals the selector's output, and the selector's order (full GPU, experts in
RAM, CPU), MTP fallback, context growth, explicit wishes and explanations behave as documented."""

from __future__ import annotations

import pytest

from backend.errors import EntryNotFoundError, InvalidRequestError
from gallery.catalog import load_catalog
from gallery.detect import GPU, HardwareProfile
from gallery.select import Request, budget_for, candidates_for, select
from gallery.table import build_table, class_profile, table_drift
from gallery.units import GiB

CAT = load_catalog()
POLICY = CAT.policy
MTP_FAMILY = candidates_for(CAT, CAT.get("qwen3.6-35b-a3b-apex-mtp"))
PLAIN_FAMILY = candidates_for(CAT, CAT.get("qwen3.6-35b-a3b-apex"))


def _gpu(vram_gib: float, ram_gib: float = 64, *, free: float | None = None) -> HardwareProfile:
    gpu = GPU(0, "Test GPU", "nvidia", int(vram_gib * GiB), None if free is None else int(free * GiB))
    return HardwareProfile("Linux", "cpu", 8, int(ram_gib * GiB), None, (gpu,))


def _cpu(ram_gib: float) -> HardwareProfile:
    return HardwareProfile("Linux", "cpu", 8, int(ram_gib * GiB), None)


def test_committed_table_matches_the_selector() -> None:
    drift = table_drift(CAT)
    assert drift is None, f"gallery/selection.yaml is stale; run `apexmtp gallery table --write`:\n{drift}"


def test_table_covers_every_family_and_class() -> None:
    table = build_table(CAT)
    assert set(table) == {e.name for e in CAT.hubs()}
    for rows in table.values():
        assert list(rows) == [c["name"] for c in CAT.classes]
        for cls, row in rows.items():
            assert row["why"] and (row["fits"] or cls in ("cpu-16g", "apple-16g")), (cls, row)


def test_24g_gpu_gets_i_compact_fully_at_long_context_with_mtp() -> None:
    sel = select(_gpu(24), MTP_FAMILY, POLICY)
    assert (sel.tier, sel.mode, sel.mtp, sel.context_size, sel.n_cpu_moe) == ("I-Compact", "gpu", True, 262144, 0)
    assert sel.device_need <= sel.device_budget == int(22.5 * GiB)
    assert sel.options == ["use_jinja:true", "spec_type:draft-mtp", "spec_n_max:6", "spec_p_min:0.75"]
    assert sel.gpu_layers == POLICY["gpu_layers_all"] and sel.cache_type_k == sel.cache_type_v == "q8_0"
    assert "I-Compact with MTP fully on the GPU" in sel.explanation and "KV @ 256k q8_0" in sel.explanation
    assert "of 22.5 GiB free" in sel.explanation and "I-Balanced would need" in sel.explanation


def test_small_gpu_keeps_experts_in_ram_with_the_fewest_layers() -> None:
    sel = select(_gpu(12, 64), PLAIN_FAMILY, POLICY)
    assert (sel.tier, sel.mode) == ("I-Balanced", "gpu+ram") and 0 < sel.n_cpu_moe < 40
    assert f"n_cpu_moe:{sel.n_cpu_moe}" in sel.options
    one_less = select(_gpu(12, 64), PLAIN_FAMILY, POLICY, Request(context=sel.context_size))
    assert one_less.n_cpu_moe == sel.n_cpu_moe  # the minimum is deterministic
    assert sel.device_need <= sel.device_budget and sel.host_need <= sel.host_budget
    assert f"routed experts of {sel.n_cpu_moe} of 40 layers in RAM" in sel.explanation


def test_mtp_is_dropped_before_the_tier() -> None:
    """With 26 GiB free I-Balanced fits at 32k only without the MTP head and context (25.4 vs 26.7 GiB):
    quality first, so MTP goes off rather than the tier down."""
    sel = select(_gpu(32, 64, free=26), MTP_FAMILY, POLICY, Request(context=32768))
    assert (sel.tier, sel.mode, sel.mtp) == ("I-Balanced", "gpu", False)
    assert "spec_type:none" in sel.options and "(MTP off)" in sel.explanation


def test_cpu_only_and_nothing_fits() -> None:
    sel = select(_cpu(32), PLAIN_FAMILY, POLICY)
    assert (sel.mode, sel.gpu_layers, sel.fits) == ("cpu", 0, True) and "no GPU" in sel.explanation
    tiny = select(_cpu(8), MTP_FAMILY, POLICY)
    assert not tiny.fits and tiny.tier == "I-Nano" and tiny.explanation.startswith("nothing fits")


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
    mac = class_profile({"name": "mac", "kind": "apple", "ram": "36GiB", "description": "Mac"})
    budget = budget_for(mac, POLICY)
    assert budget.unified and budget.gpu_free == int(36 * GiB * 0.75)
    sel = select(mac, MTP_FAMILY, POLICY)
    assert sel.mode == "gpu" and sel.host_need == 0 and "in unified memory" in sel.explanation


def test_detected_free_memory_beats_the_reserve_rule() -> None:
    assert budget_for(_gpu(24, free=10), POLICY).gpu_free == 10 * GiB
    assert budget_for(_gpu(24), POLICY).gpu_free == int(22.5 * GiB)
    profile = HardwareProfile("Linux", "cpu", 8, 64 * GiB, 40 * GiB)
    assert budget_for(profile, POLICY).ram_free == 40 * GiB
