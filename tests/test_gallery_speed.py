"""The speed model (gallery/speed.py): bytes touched per token, MTP gain, bandwidth lookup and the cached probe, and
the calibration it was fitted to: this machine's figures recorded by bench/bench_predict.py (SmolLM2 and the
synthetic presets) and published DGX Spark figures. No timing here: predictions are checked against recorded
measurements."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from backend.core import constants
from backend.core.gguf_file import read_gguf
from backend.core.units import GiB
from backend.synth.qwen35moe import read_synth_info
from gallery.catalog import DATA_DIR, load_catalog
from gallery.detect import GPU, HardwareProfile
from gallery.estimate import ArchFacts, RunConfig, weights_from_gguf
from gallery.select import candidates_for
from gallery.speed import GB, bandwidth_for, gpu_bandwidth, predict, token_bytes

CAT = load_catalog()
SPEED = CAT.policy.speed
MTP_FAMILY = candidates_for(CAT, CAT.get("qwen3.6-35b-a3b-apex-mtp"))
CALIBRATION = yaml.safe_load((DATA_DIR / "speed_calibration.yaml").read_text())
# DGX Spark GB10 (unified, 273 GB/s), llama-bench tg128, Qwen3.5-35B-A3B APEX tiers (apex-method.md §3.2)
PUBLISHED_GB10 = {"I-Balanced": 61.4, "I-Quality": 63.1, "I-Compact": 69.8, "Mini": 74.4}


def _cpu(gbps: float) -> HardwareProfile:
    return HardwareProfile("Linux", "cpu", 2, 24 * GiB, None, ram_bandwidth=gbps * GB)


def test_bytes_per_token_are_dense_weights_active_experts_kv_and_state() -> None:
    cand = MTP_FAMILY[0]  # I-Balanced with its MTP layer
    run = RunConfig(n_ctx=262144, mtp=True, spec_n_max=6)
    tb = token_bytes(cand.arch, cand.weights, run, at_context=4096)
    w = cand.weights
    assert tb.dense == w.other and tb.experts == int(w.routed_experts * 8 / 256)
    assert tb.kv == 4096 * 10880  # q8_0 KV of 10 attention layers, read at 4k tokens, not at the 256k planned
    assert tb.state == 2 * 65_863_680  # 62.8 MiB of recurrent state read and written
    assert 0 < tb.draft < w.mtp + w.token_embd
    assert tb.plain == tb.dense + tb.experts + tb.kv + tb.state


def test_tied_lm_head_is_read_every_token(smollm2_path: Path) -> None:
    info = read_gguf(smollm2_path)
    arch = ArchFacts.from_gguf(info)
    w = weights_from_gguf(info, arch)
    assert w.output_tied and w.routed_experts == 0
    assert token_bytes(arch, w, RunConfig(n_ctx=2048), at_context=0).dense == w.total


def test_mtp_gain_follows_acceptance_and_never_loses() -> None:
    cand = MTP_FAMILY[4]
    gpu = GPU(0, "NVIDIA A100-SXM4-80GB", "nvidia", 80 * GiB, None)
    bw = bandwidth_for(HardwareProfile("Linux", "x", 8, 256 * GiB, None, (gpu,)), gpu, SPEED)
    run = RunConfig(n_ctx=4096, mtp=True, spec_n_max=6)
    gains = [predict(cand.arch, cand.weights, run, "gpu", 0, bw, SPEED, (rate, 4)).mtp_gain
             for rate in (0.0, 0.4, 0.76, 0.95)]
    assert gains[0] == 1.0 and gains == sorted(gains) and gains[-1] > 1.3
    none = predict(cand.arch, cand.weights, run, "gpu", 0, bw, SPEED, (0.0, 4))
    assert none.k == 0 and none.tok_s == none.plain_tok_s
    # the A100 measurement the GPU constants were fitted to: 1.49x at 76% acceptance, k=4 (apex-method.md §7)
    fixed4 = predict(cand.arch, cand.weights, RunConfig(n_ctx=4096, mtp=True, spec_n_max=4), "gpu", 0, bw, SPEED)
    assert fixed4.k == 4 and abs(fixed4.mtp_gain / 1.489 - 1) < 0.15


def test_experts_in_ram_and_cpu_plans_are_slower_than_the_gpu() -> None:
    cand = MTP_FAMILY[0]
    gpu = GPU(0, "NVIDIA GeForce RTX 4090", "nvidia", 24 * GiB, None)
    profile = HardwareProfile("Linux", "x", 8, 64 * GiB, None, (gpu,), ram_bandwidth=60 * GB)
    bw = bandwidth_for(profile, gpu, SPEED)
    run = RunConfig(n_ctx=32768)
    speeds = [predict(cand.arch, cand.weights, run, mode, n, bw, SPEED).tok_s
              for mode, n in (("gpu", 0), ("gpu+ram", 5), ("gpu+ram", 20), ("gpu+ram", 40), ("cpu", 0))]
    assert speeds == sorted(speeds, reverse=True)


def test_gpu_bandwidth_comes_from_the_class_the_datasheet_table_or_the_vendor() -> None:
    assert gpu_bandwidth(GPU(0, "NVIDIA H100 PCIe", "nvidia", 80 * GiB, None), SPEED)[0] == 2000 * GB
    assert gpu_bandwidth(GPU(0, "NVIDIA H100 80GB HBM3", "nvidia", 80 * GiB, None), SPEED)[0] == 3350 * GB
    assert gpu_bandwidth(GPU(0, "Apple M3 Pro", "apple", 36 * GiB, None, unified=True), SPEED)[0] == 150 * GB
    assert gpu_bandwidth(GPU(0, "x", "class", 8 * GiB, None, bandwidth=272 * GB), SPEED)[0] == 272 * GB
    unknown, source = gpu_bandwidth(GPU(0, "Mystery 9000", "amd", 8 * GiB, None), SPEED)
    assert unknown == 500 * GB and "assumed" in source
    assert bandwidth_for(HardwareProfile("Linux", "x", 2, GiB, None), None, SPEED).device == SPEED.ram_gbps * GB


@pytest.mark.parametrize("row", CALIBRATION["rows"], ids=lambda r: r["model"])
def test_predictions_stay_within_the_bench_tolerance_of_what_was_measured(row: dict, smollm2_path: Path) -> None:
    """bench_predict.py --write recorded these on this project's CI machine; the model must still predict them."""
    path = smollm2_path if row["model"].startswith("SmolLM2") else constants.CACHE_DIR / "bench" / row["file"]
    if not path.exists():
        pytest.skip(f"{path.name} is built by bench/bench_predict.py")
    info = read_gguf(path)
    arch = ArchFacts.from_gguf(info)
    acceptance = None
    if row["mtp"]:
        synth = read_synth_info(path)
        acceptance = (synth.expected_acceptance, synth.n_draft)
    speed = replace(SPEED, at_context=CALIBRATION["at_context"])
    run = RunConfig(n_ctx=2048, cache_type_k="f16", cache_type_v="f16", mtp=row["mtp"],
                    spec_n_max=6 if row["mtp"] else 0)
    bw = bandwidth_for(_cpu(CALIBRATION["ram_gbps"]), None, speed)
    pred = predict(arch, weights_from_gguf(info, arch), run, "cpu", 0, bw, speed, acceptance).tok_s
    assert abs(pred / row["measured_tok_s"] - 1) <= CALIBRATION["tolerance"], (pred, row)


def test_published_unified_memory_figures_are_predicted_within_the_tolerance() -> None:
    gpu = GPU(0, "NVIDIA GB10", "nvidia", 128 * GiB, None, unified=True)
    bw = bandwidth_for(HardwareProfile("Linux", "Grace", 20, 128 * GiB, None, (gpu,)), gpu, SPEED)
    speed = replace(SPEED, at_context=512)
    for cand in candidates_for(CAT, CAT.get("qwen3.5-35b-a3b-apex")):
        if cand.tier in PUBLISHED_GB10:
            pred = predict(cand.arch, cand.weights, RunConfig(n_ctx=4096, cache_type_k="f16", cache_type_v="f16"),
                           "gpu", 0, bw, speed).tok_s
            assert abs(pred / PUBLISHED_GB10[cand.tier] - 1) <= CALIBRATION["tolerance"], (cand.tier, pred)
