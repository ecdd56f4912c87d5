"""How far the gallery's memory estimator is from llama.cpp's own allocation.

For each model and configuration, llama.cpp loads the model with `no_alloc` (its `--fit` dry run) and creates the
target and MTP contexts (`gallery.measure`, CPU backend); the estimator (`gallery.estimate`) predicts the same
components from the GGUF header alone. Models: a sparse file with the real Qwen3.5/3.6-35B-A3B shapes and APEX-like
tensor types (I-Compact-like rule), and the synthetic presets tiny/small/bench. Prints one row per configuration
and a summary of the worst relative error per component; `--json PATH` saves the rows.

    .venv/bin/python bench/bench_estimate.py [--quick] [--json bench/out/estimate.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from backend.core.gguf_file import read_gguf
from backend.synth.qwen35moe import (
    PRESETS,
    REAL_CONFIGS,
    apex_like_type,
    model_metadata,
    tensor_layout,
    write_model,
    write_sparse,
)
from gallery.estimate import ArchFacts, RunConfig, estimate, weights_from_gguf
from gallery.measure import ContextSpec, measure

MiB = 1024 * 1024
REAL = REAL_CONFIGS["qwen35moe-35b-a3b"]
COMPONENTS = ("kv", "rs", "compute", "mtp_kv", "mtp_compute")



def models(workdir: Path, quick: bool) -> dict[str, Path]:
    out = {"qwen35moe-35b-a3b (sparse, real shapes)": write_sparse(
        workdir / "real.gguf", model_metadata(REAL), [(n, ne, apex_like_type(n, ne)) for n, ne in tensor_layout(REAL)])}
    for preset in ("tiny",) if quick else ("tiny", "small", "bench"):
        out[f"synthetic {preset}"] = write_model(workdir / f"{preset}.gguf", replace(PRESETS[preset], mtp=True),
                                                 dtype="f16")
    return out


def specs(n_ctx_train: int, quick: bool) -> list[ContextSpec]:
    contexts = [c for c in ((4096, 32768, 262144) if quick else (4096, 32768, 131072, 262144)) if c <= max(n_ctx_train, 65536)]
    out = [ContextSpec(c, type_k=k, type_v=k, mtp=True, n_rs_seq=6) for c in contexts for k in ("q8_0", "f16")]
    out += [ContextSpec(c, type_k="q8_0", type_v="q8_0") for c in contexts]
    if not quick:
        out += [ContextSpec(c, n_ubatch=u, n_batch=u, type_k="q8_0", type_v="q8_0", mtp=True, n_rs_seq=3)
                for c in contexts[:2] for u in (128, 2048)]
    return out


def compare(path: Path) -> list[dict[str, object]]:
    info = read_gguf(path)
    arch = ArchFacts.from_gguf(info)
    weights = weights_from_gguf(info, arch)
    rows = []
    for m in measure(path, specs(arch.n_ctx_train, QUICK)):
        s = m.spec
        b = estimate(arch, weights, RunConfig(n_ctx=s.n_ctx, n_ubatch=s.n_ubatch, cache_type_k=s.type_k,
                                              cache_type_v=s.type_v, mtp=s.mtp, spec_n_max=s.n_rs_seq))
        measured = {"kv": m.kv, "rs": m.rs, "compute": m.compute, "mtp_kv": m.mtp_kv or 0, "mtp_compute": m.mtp_compute or 0}
        est = {k: getattr(b, k) for k in COMPONENTS}
        # weights: tensor bytes (llama.cpp's no_alloc model buffer prints 0); logits buffers: estimated on both sides
        fixed = (weights.total if s.mtp else weights.total - weights.mtp) + b.output + b.mtp_output
        rows.append({"n_ctx": s.n_ctx, "n_ubatch": s.n_ubatch, "kv_type": s.type_k, "mtp": s.mtp,
                     "measured": measured, "estimated": est,
                     "total_measured": fixed + sum(measured.values()), "total_estimated": b.total})
    return rows


def _err(est: int, meas: int) -> float | None:
    return None if not meas else (est - meas) / meas


def report(name: str, rows: list[dict[str, object]]) -> dict[str, float]:
    print(f"\n== {name}")
    print(f"{'ctx':>7} {'ub':>5} {'kv':>5} {'mtp':>4} | {'KV MiB':>9} {'RS MiB':>8} {'compute MiB':>12} "
          f"{'MTP KV':>8} {'MTP comp':>9} | {'total GiB':>9} {'error':>7}")
    worst: dict[str, float] = {}
    for r in rows:
        meas, est = r["measured"], r["estimated"]
        cells = []
        for k in COMPONENTS:
            e = _err(est[k], meas[k])
            if e is not None:
                worst[k] = max(worst.get(k, 0.0), abs(e))
            cells.append(f"{meas[k] / MiB:.1f}{'' if e is None else f'{e:+.1%}'.rjust(7)}" if meas[k] else "-")
        total_err = _err(r["total_estimated"], r["total_measured"])
        worst["total"] = max(worst.get("total", 0.0), abs(total_err))
        print(f"{r['n_ctx']:>7} {r['n_ubatch']:>5} {r['kv_type']:>5} {str(r['mtp'])[0]:>4} | "
              + " ".join(c.rjust(w) for c, w in zip(cells, (14, 13, 16, 13, 14)))
              + f" | {r['total_measured'] / 1024**3:9.3f} {total_err:+7.3%}")
    print("worst |error|: " + ", ".join(f"{k} {v:.2%}" for k, v in worst.items()))
    return worst


def main() -> int:
    global QUICK
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer configurations, tiny synthetic model only")
    parser.add_argument("--json", type=Path, help="save all rows here")
    args = parser.parse_args()
    QUICK = args.quick
    print(f"llama.cpp dry runs (CPU backend, flash attention on) on {platform.machine()} {platform.system()}")
    results = {}
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="bench-estimate-") as tmp:
        for name, path in models(Path(tmp), args.quick).items():
            rows = compare(path)
            results[name] = {"rows": rows, "worst": report(name, rows)}
    print(f"\n({time.time() - t0:.0f} s)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1))
    return 0


QUICK = False

if __name__ == "__main__":
    raise SystemExit(main())
