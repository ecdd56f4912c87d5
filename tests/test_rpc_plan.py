"""Planning with RPC workers: the layer split (llama.cpp's rule, each holder's share), split plans in the selector
(fits only across hosts, monotonic in worker memory, the options the engine needs), and `apexmtp hw/pull --rpc`
against two real `apexmtp worker` processes on loopback, with local memory made small by APEXMTP_RAM."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace

import pytest
from conftest import ROOT, WorkerProcess, endpoints, free_port

from backend.core.units import GiB
from gallery.catalog import load_catalog
from gallery.detect import GPU, HardwareProfile, RemoteDevice
from gallery.estimate import Holder, RunConfig, estimate, split, split_layers
from gallery.select import Request, budget_for, candidates_for, select

CAT = load_catalog()
POLICY = CAT.policy
MTP_FAMILY = candidates_for(CAT, CAT.get("qwen3.6-35b-a3b-apex-mtp"))
PLAIN_FAMILY = candidates_for(CAT, CAT.get("qwen3.6-35b-a3b-apex"))
ORDER = POLICY.tier_order


def _cpu(ram_gib: float, *workers_gib: float) -> HardwareProfile:
    """A CPU box reading RAM at 200 GB/s (so that tiers pass the speed floor) with workers of these sizes."""
    workers = tuple(RemoteDevice(f"10.0.0.{i + 2}:50052", f"RPC0[10.0.0.{i + 2}:50052]", int(w * GiB), int(w * GiB))
                    for i, w in enumerate(workers_gib))
    return HardwareProfile("Linux", "cpu", 8, int(ram_gib * GiB), None, workers=workers, ram_bandwidth=200e9)


# ----------------------------------------------------------------------------------------- the split arithmetic


def test_layer_slots_are_dealt_as_llama_cpp_deals_them():
    assert split_layers(42, [1.0, 1.0]) == [21, 21]
    assert split_layers(42, [3.0, 1.0]) == [32, 10]  # slot j -> first split point > j/42: 0.75 * 42 = 31.5
    assert split_layers(10, [0.0, 5.0, 5.0]) == [0, 5, 5]
    assert split_layers(7, [0.0, 0.0]) == [4, 3]  # nothing reported: an even split
    assert sum(split_layers(41, [7.3, 2.2, 9.9])) == 41


def test_every_byte_lands_once_and_the_head_and_output_sit_on_the_last_device():
    cand = MTP_FAMILY[-1]
    run = RunConfig(n_ctx=32768, mtp=True, spec_n_max=6)
    b = estimate(cand.arch, cand.weights, run)
    holders = [Holder("local RAM", "local", 10 * GiB, GiB, device=False, host=True),
               Holder("RPC0[a:1]", "a:1", 10 * GiB, GiB), Holder("RPC0[b:1]", "b:1", 20 * GiB, GiB)]
    cpu, a, last = split(b, cand.arch, run, holders, tied=cand.weights.output_tied)
    n_slots = cand.arch.n_layer + cand.arch.n_nextn + 1
    assert cpu.layers + a.layers + last.layers == n_slots
    # the CPU: slots j/42 < 1/4 (11); the devices split the other 31 by 1:2, slots j/31 < 1/3 (11) to the first
    assert (cpu.layers, a.layers, last.layers) == (11, 11, 20)
    assert abs(sum(s.weights for s in (cpu, a, last)) - b.weights) <= 3  # rounding per holder
    assert abs(sum(s.kv for s in (cpu, a, last)) - (b.kv + b.mtp_kv)) <= 3
    assert last.weights > a.weights and last.kv > a.kv  # MTP layer + draft KV + LM head
    assert cpu.weights > a.weights + b.token_embd // 2  # token_embd stays on this host
    assert last.other > a.other  # the logits phase of the compute buffer is the output device's
    # a head tied to token_embd: llama.cpp loads a copy of token_embd for the output layer, on its device
    tied = split(b, cand.arch, run, holders, tied=True)
    assert abs(sum(s.weights for s in tied) - b.weights - b.token_embd) <= 3


def test_the_local_cpu_never_takes_every_slot_while_there_are_workers():
    cand = PLAIN_FAMILY[-1]
    run = RunConfig(n_ctx=4096)
    b = estimate(cand.arch, cand.weights, run)
    holders = [Holder("local RAM", "local", 500 * GiB, GiB, device=False, host=True),
               Holder("RPC0[a:1]", "a:1", 1, GiB)]
    cpu, worker = split(b, cand.arch, run, holders, tied=cand.weights.output_tied)
    assert worker.layers == 1 and cpu.layers == cand.arch.n_layer + cand.arch.n_nextn  # n_gpu_layers >= 1


# ----------------------------------------------------------------------------------------- selection


def test_a_tier_that_fits_only_across_hosts_is_offered_and_explained():
    alone = select(_cpu(16), MTP_FAMILY, POLICY)
    assert not alone.fits
    sel = select(_cpu(16, 24), MTP_FAMILY, POLICY)
    assert sel.fits and sel.mode == "split"
    assert "fits only across 2 hosts (this host alone would need" in sel.explanation
    assert "local RAM" in sel.explanation and "RPC0[10.0.0.2:50052]" in sel.explanation
    assert "rpc_servers:10.0.0.2:50052" in sel.options
    cpu_layers = sel.shares[0].layers
    assert 0 < cpu_layers and sel.gpu_layers == sum(s.layers for s in sel.shares) - cpu_layers
    devices = sel.devices()
    assert [d["device"] for d in devices] == ["local RAM", "RPC0[10.0.0.2:50052]"]
    assert all(d["fits"] and d["need_gib"] <= d["free_gib"] for d in devices)


def test_a_tier_that_fits_locally_is_still_split_and_says_so():
    sel = select(_cpu(64, 16), PLAIN_FAMILY, POLICY, Request(context=4096))
    assert sel.fits and sel.mode == "split" and "would fit on this host alone too" in sel.explanation


def test_nothing_fitting_across_hosts_names_the_holders_that_overflow():
    sel = select(_cpu(8, 2), MTP_FAMILY, POLICY)
    assert not sel.fits and sel.explanation.startswith("nothing fits: even I-Nano split across 2 hosts")
    assert "too much for" in sel.explanation


@pytest.mark.parametrize("prefer", ["quality", "speed"])
def test_more_worker_memory_never_gives_a_worse_tier_or_a_slower_plan(prefer):
    """One 16 GiB host plus a worker of 4..96 GiB, then a second worker: quality never drops a tier, speed never
    drops tok/s."""
    def good(tier: str) -> bool:
        return ORDER.index(tier) <= ORDER.index(POLICY.objectives.quality_floor)

    previous = None
    for profile in [_cpu(16, w) for w in range(4, 97, 4)] + [_cpu(16, 96, w) for w in range(8, 97, 8)]:
        sel = select(profile, MTP_FAMILY, POLICY, Request(prefer=prefer))
        if previous is not None and previous.fits:
            assert sel.fits
            if prefer == "quality":
                assert ORDER.index(sel.tier) <= ORDER.index(previous.tier), (previous.tier, sel.tier)
            elif len(sel.rpc_servers) == len(previous.rpc_servers) and good(previous.tier):
                # (each worker host costs its RPC time; below the quality floor, speed takes any tier until a good
                # one fits, as it does with VRAM)
                assert sel.predicted_tok_s >= previous.predicted_tok_s - 1e-9
        previous = sel
    assert previous is not None and previous.fits and (previous.tier == ORDER[0] or prefer == "speed")


def test_a_local_gpu_is_the_last_device_and_ram_keeps_only_the_host_part():
    gpu = GPU(0, "Test GPU", "nvidia", 24 * GiB, 22 * GiB)
    profile = replace(_cpu(64, 24), gpus=(gpu,))
    sel = select(profile, MTP_FAMILY, POLICY)
    names = [s.holder.name for s in sel.shares]
    assert names == ["local RAM", "RPC0[10.0.0.2:50052]", "local Test GPU"]
    assert sel.shares[0].layers == 0 and sel.gpu_layers == POLICY.gpu_layers_all
    assert sel.shares[0].weights >= sel.breakdown.token_embd


def test_what_if_workers_plan_without_addresses():
    profile = replace(_cpu(16), workers=(RemoteDevice("what-if-1", "RPC0[what-if-1]", 32 * GiB, 32 * GiB, True),))
    sel = select(profile, MTP_FAMILY, POLICY)
    assert sel.fits and sel.what_if and "from --rpc-mem" in sel.explanation
    assert not any(o.startswith("rpc_servers:") for o in sel.options)
    assert budget_for(profile, POLICY).what_if


# ----------------------------------------------------------------------------------------- live, on loopback


def _apexmtp(*args: str, ram: str = "8GiB") -> subprocess.CompletedProcess:
    env = {**os.environ, "APEXMTP_RAM": ram, "APEXMTP_VRAM": "0"}
    return subprocess.run([sys.executable, "-m", "backend.cli", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)


@pytest.fixture(scope="module")
def workers():
    """Two workers advertising 8 and 12 GiB (`--mem`): nothing is allocated until a model is loaded."""
    ws = [WorkerProcess("--mem", "8GiB"), WorkerProcess("--mem", "12GiB")]
    yield ws
    for w in ws:
        w.stop()


def test_hw_rpc_reports_the_workers_memory_and_plans_across_hosts(workers):
    out = _apexmtp("hw", "--rpc", ",".join(endpoints(workers)), "--context", "4096", "--json")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert [(w["endpoint"], [(d["name"], d["free"], d["total"]) for d in w["devices"]]) for w in data["rpc"]] == [
        (workers[0].endpoint, [(f"RPC0[{workers[0].endpoint}]", 8 * GiB, 8 * GiB)]),
        (workers[1].endpoint, [(f"RPC0[{workers[1].endpoint}]", 12 * GiB, 12 * GiB)])]
    pick = data["picks"]["qwen3.6-35b-a3b-apex-mtp"]  # no tier fits in 8 GiB of RAM alone
    assert pick["fits"] and pick["placement"] == "split", pick["why"]
    assert "fits only across 3 hosts" in pick["why"]
    assert [d["device"] for d in pick["devices"]] == ["local RAM"] + [f"RPC0[{w.endpoint}]" for w in workers]
    assert all(d["fits"] and d["layers"] > 0 for d in pick["devices"])
    assert f"rpc_servers:{','.join(endpoints(workers))}" in pick["options"]
    text = _apexmtp("hw", "--rpc", ",".join(endpoints(workers)), "--context", "4096")
    assert text.returncode == 0 and f"RPC worker {workers[0].endpoint}: RPC0[{workers[0].endpoint}] 8.0 GiB" in \
        text.stdout and f"    RPC0[{workers[1].endpoint}]: " in text.stdout


def test_the_planned_split_is_the_one_llama_cpp_makes(workers, smollm2_path):
    """SmolLM2 planned over this host (16 GiB) and the two workers, then loaded with the plan's n_gpu_layers: each
    device holds the layers the plan gave it (KV per device) and the weights it predicted."""
    from backend.engine.llama import Engine, EngineConfig
    from gallery.detect import add_workers
    from gallery.pull import _exact_candidate

    profile = add_workers(HardwareProfile("Linux", "cpu", 2, 16 * GiB, None), endpoints(workers))
    sel = select(profile, [_exact_candidate(smollm2_path, "smol", "file", (), False)], POLICY, Request(context=2048))
    assert sel.mode == "split" and [s.holder.name for s in sel.shares] == \
        ["local RAM"] + [f"RPC0[{w.endpoint}]" for w in workers]
    engine = Engine(smollm2_path, EngineConfig(n_ctx=2048, n_threads=1, n_gpu_layers=sel.gpu_layers,
                                               rpc_servers=endpoints(workers), type_k="q8_0", type_v="q8_0"))
    try:
        for share in sel.shares:
            device = "CPU" if share.holder.where == "local" else share.holder.name
            kv = engine.memory[f"device:{device}:target_kv"]
            assert abs(kv - share.kv) <= 0.01 * share.kv, (device, kv, share.kv)
            if share.holder.where != "local":  # (this host's buffer is the mmapped file range, not the bytes)
                model = engine.memory[f"device:{device}:model"]
                assert abs(model - share.weights) <= 0.25 * share.weights, (device, model, share.weights)
    finally:
        engine.close()


def test_pull_rpc_writes_a_config_that_splits(workers, smollm2_path, tmp_path):
    out = _apexmtp("pull", str(smollm2_path), "--rpc", ",".join(endpoints(workers)), "--models-dir", str(tmp_path),
                   "--context", "2048", "--quiet", ram="64GiB")
    assert out.returncode == 0, out.stderr
    assert f"rpc_servers:{','.join(endpoints(workers))}" in out.stdout
    assert "split across 3 hosts (it would fit on this host alone too" in out.stdout


def test_an_unreachable_worker_is_named_without_a_traceback(workers):
    dead = f"127.0.0.1:{free_port()}"
    out = _apexmtp("hw", "--rpc", f"{workers[0].endpoint},{dead}")
    assert out.returncode != 0 and f"RPC worker {dead}: Connection refused" in out.stderr
    assert "Traceback" not in out.stderr
