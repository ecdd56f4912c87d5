"""Quantizer costs on a synthetic qwen35moe + MTP model: imatrix collection with vs without the MTP head, and
every tier's build time, size and size-prediction error, side by side.

    .venv/bin/python bench/bench_quantize.py [--layers 8] [--experts 8] [--chunks 8] [--tiers all]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from backend.synth.qwen35moe import SynthConfig, write_model
from quantizer.evaluate import DEFAULT_CALIBRATION_TEXT
from quantizer.imatrix import collect_imatrix
from quantizer.quantize import quantize_tier
from quantizer.recipes import parse_tiers


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--chunks", type=int, default=8)
    p.add_argument("--ctx", type=int, default=256)
    p.add_argument("--tiers", default="all")
    args = p.parse_args()
    cfg = SynthConfig(n_layer=args.layers, n_expert=args.experts, n_expert_used=2)
    text = DEFAULT_CALIBRATION_TEXT.read_text()
    with tempfile.TemporaryDirectory() as d:
        src = write_model(Path(d) / "Bench-F16.gguf", cfg, mode="random", dtype="f16")
        print(f"source: {src.stat().st_size / 2**20:.1f} MiB, {args.layers}+1 layers, {args.experts} experts")
        times = {}
        for mtp in (False, True):
            t0 = time.perf_counter()
            im = collect_imatrix(src, text, n_ctx=args.ctx, n_chunks=args.chunks, mtp=mtp)
            times[mtp] = time.perf_counter() - t0
        tokens = args.chunks * args.ctx
        print(f"imatrix, {tokens} tokens: trunk only {times[False]:.2f} s ({tokens / times[False]:.0f} tok/s), "
              f"with MTP head {times[True]:.2f} s ({tokens / times[True]:.0f} tok/s), "
              f"ratio {times[True] / times[False]:.2f}x")
        print(f"{'tier':<11} {'MiB':>8} {'pred. err':>10} {'seconds':>8} {'MiB/s in':>9}")
        for tier in parse_tiers(args.tiers, "scaled"):
            r = quantize_tier(src, tier, Path(d) / "out", im)
            rate = src.stat().st_size / 2**20 / r.seconds
            print(f"{r.tier:<11} {r.size_bytes / 2**20:8.2f} {100 * r.prediction_error:+9.4f}% "
                  f"{r.seconds:8.2f} {rate:9.1f}")


if __name__ == "__main__":
    main()
