"""MTP self-speculation vs plain decoding, measured side by side in one run.

For predictable synthetic qwen35moe models at several acceptance rates: tokens/s of plain decoding (no MTP
context), MTP at fixed k = 1..6, adaptive k (our default, p_min 0) and adaptive k with LocalAI's auto-MTP
settings (spec_n_max 6, spec_p_min 0.75); acceptance and mean accepted length. Rounds interleave the
configurations so machine noise hits them alike; the median of the rounds is reported.

    python bench/bench_mtp.py [--preset bench] [--acceptance 1.0,0.95,0.75,0.4] [--tokens 128] [--rounds 3]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, median

from backend.core import constants
from backend.engine.generation import GenerationRequest
from backend.engine.llama import Engine, EngineConfig
from backend.engine.scheduler import Scheduler, collect
from backend.engine.speculative import SpecConfig
from backend.synth.qwen35moe import PRESETS, write_model


def model_file(preset: str, acceptance: float, n_draft: int) -> Path:
    path = constants.CACHE_DIR / "bench" / f"{preset}-predictable-a{acceptance:g}.gguf"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        write_model(path, PRESETS[preset], mode="predictable", acceptance=acceptance, dtype="f16", n_draft=n_draft)
    return path


def measure(model: Scheduler, prompt: list[int], tokens: int, n_draft: int | None = None) -> tuple[float, float, float]:
    model.engine.reset()
    r = collect(model, GenerationRequest(prompt=prompt, max_tokens=tokens, ignore_eos=True, n_draft=n_draft))
    return r.tokens_per_second, r.stats.acceptance_rate, r.stats.mean_accepted_length


def bench_one(path: Path, args: argparse.Namespace) -> list[tuple[str, float, float, float]]:
    base = dict(n_ctx=2048, n_batch=256, n_threads=args.threads)
    plain = Scheduler(Engine(path, EngineConfig(**base)), SpecConfig(), name="plain")
    fixed = Scheduler(Engine(path, EngineConfig(**base, mtp=True, n_draft_max=6)), SpecConfig(n_max=6, adaptive=False),
                      name="fixed")
    adaptive = Scheduler(Engine(path, EngineConfig(**base, mtp=True, n_draft_max=6)), SpecConfig(n_max=6), name="adaptive")
    # What LocalAI's importer writes when it turns MTP on by itself (core/config/mtp.go): spec_n_max 6, spec_p_min 0.75
    localai = Scheduler(Engine(path, EngineConfig(**base, mtp=True, n_draft_max=6)), SpecConfig(n_max=6, p_min=0.75),
                        name="p_min 0.75")
    prompt = plain.engine.tokenize("Benchmarking speculative decoding on a synthetic model. " * 4)
    configs = [("plain", plain, None)] + [(f"k={k}", fixed, k) for k in range(1, 7)] + [("adaptive", adaptive, None),
                                                                                   ("p_min 0.75", localai, None)]
    for _, model, k in configs:  # warm-up: page in weights, build graphs, let the adaptive controller learn
        measure(model, prompt, 32, k)
    samples: dict[str, list[tuple[float, float, float]]] = {name: [] for name, _, _ in configs}
    for _ in range(args.rounds):
        for name, model, k in configs:
            samples[name].append(measure(model, prompt, args.tokens, k))
    for m in (plain, fixed, adaptive, localai):
        m.close()
    return [(name, median([s[0] for s in v]), median([s[1] for s in v]), median([s[2] for s in v]))
            for name, v in samples.items()]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="bench", choices=sorted(PRESETS))
    ap.add_argument("--acceptance", default="1.0,0.95,0.75,0.4")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    print(f"# machine: {machine()}")
    print(f"# preset {args.preset}, {args.tokens} tokens, median of {args.rounds} rounds, greedy")
    for acc in (float(a) for a in args.acceptance.split(",")):
        path = model_file(args.preset, acc, 4)
        print(f"\n## model {path.name} ({path.stat().st_size / 2**20:.0f} MiB), built for acceptance {acc:g}")
        rows = bench_one(path, args)
        plain_tps = rows[0][1]
        best_fixed = max(rows[1:7], key=lambda r: r[1])
        by_name = {r[0]: r[1] for r in rows}
        print(f"{'config':<10} {'tok/s':>8} {'x plain':>8} {'accept':>7} {'mean len':>8}")
        for name, tps, acc_rate, mal in rows:
            print(f"{name:<10} {tps:8.1f} {tps / plain_tps:8.2f} {acc_rate:7.1%} {mal:8.2f}")
        print(f"adaptive / best fixed ({best_fixed[0]}): {by_name['adaptive'] / best_fixed[1]:.2f}; "
              f"adaptive p_min 0 / p_min 0.75 (LocalAI's auto-MTP): {by_name['adaptive'] / by_name['p_min 0.75']:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
