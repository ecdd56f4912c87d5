"""Speed that holds across reloads: one backend process, many LoadModel / generate / Free cycles, as LocalAI drives it.

Each cycle loads the model (every other cycle after a Free, the others straight over the loaded one, and every
fourth switching through a second model first), streams a fixed number of greedy tokens, and records the decode
tok/s the backend reports, the process's thread count and RSS. Printed per cycle, then the last-10/first-10
tok/s ratio, the thread delta and the RSS growth, with MTP off and on. RSS counts the model file's mmapped pages,
which change with whatever was loaded last; the anonymous part (RssAnon: heap, KV, buffers) is what a leak grows.

With `--prompt-cache`, the model is loaded with the prompt caches on (a disk cache in a temporary directory, the RAM
cache, checkpoints): every reload writes the slots to disk and the next cycle's prompt is restored from there, so
the figures show whether the caches leak or restore anything stale (each cycle's answer must equal the first's).

    python bench/bench_soak.py [--cycles 50] [--tokens 128] [--prompt-cache]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_mtp import model_file
from common import machine, median

from backend.api.supervisor import Backend
from backend.proto import backend_pb2 as pb

PROMPT = "Benchmarking a backend that stays up for hours. " * 4


def cycle_options(path: Path, mtp: bool, threads: int, cache_dir: str = "") -> pb.ModelOptions:
    options = ["spec_n_max:4", "spec_adaptive:false"] if mtp else ["spec_type:none"]
    if cache_dir:
        options += [f"prompt_cache_dir:{cache_dir}", "prompt_cache_min_tokens:16", "cache_ram:256"]
    return pb.ModelOptions(ModelFile=str(path), Model=path.name, ContextSize=1024, Threads=threads, NBatch=256,
                           MMap=True, Options=options)


def anon_rss(pid: int) -> int:
    """Anonymous resident memory (Linux RssAnon) of a process in bytes, 0 where /proc does not say."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def soak(path: Path, other: Path, mtp: bool, args: argparse.Namespace, cycles: int,
         reload: bool = True) -> list[tuple[float, int, int, int]]:
    """Per cycle: (decode tok/s, threads, RSS, anonymous RSS) of one backend process; `reload=False` loads once and
    only generates, the control that tells a slower process from a slower machine."""
    backend = Backend(echo=False)
    rows = []
    answers: set[bytes] = set()
    cached = 0
    try:
        backend.wait_healthy()
        proc = psutil.Process(backend.proc.pid)
        # run.sh execs python: the backend is the process itself (or its only child)
        proc = next(iter(proc.children()), proc)
        for c in range(cycles):
            if reload and c % 4 == 3:
                backend.load(cycle_options(other, False, args.threads, args.cache_dir))  # a model switch in between
            elif reload and c % 2:
                backend.stub.Free(pb.HealthMessage())
            if reload or c == 0:
                backend.load(cycle_options(path, mtp, args.threads, args.cache_dir))
            replies = list(backend.stub.PredictStream(pb.PredictOptions(Prompt=PROMPT, Tokens=args.tokens,
                                                                        IgnoreEOS=True)))
            final = replies[-1]
            answers.add(b"".join(r.message for r in replies))
            cached += final.cached_prompt_tokens > 0
            tps = 1000.0 * max(final.tokens - 1, 0) / final.timing_token_generation
            rows.append((tps, proc.num_threads(), proc.memory_info().rss, anon_rss(proc.pid)))
            print(f"  cycle {c + 1:3d}: {tps:7.1f} tok/s, {rows[-1][1]:3d} threads, RSS {rows[-1][2] / 2**20:7.1f} MiB "
                  f"(anon {rows[-1][3] / 2**20:6.1f})", flush=True)
    finally:
        backend.stop()
    if args.cache_dir:
        print(f"  prompt cache: {cached} of {len(rows)} cycles reused the prompt; {len(answers)} distinct answer(s) "
              f"(1 means no restore changed the output)")
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cycles", type=int, default=50)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-cache", action="store_true", help="load with the prompt caches on (see above)")
    args = ap.parse_args()
    args.cache_dir = tempfile.mkdtemp(prefix="apexmtp-soak-") if args.prompt_cache else ""
    print(f"# machine: {machine()}")
    print(f"# {args.cycles} cycles, {args.tokens} greedy tokens each, {args.threads} threads")
    path = model_file("bench", 1.0, 4)
    other = model_file("tiny", 1.0, 4)
    for mtp in (False, True):
        print(f"\n## {path.name}, MTP {'on (k=4)' if mtp else 'off'}")
        rows = soak(path, other, mtp, args, args.cycles)
        n = min(10, len(rows) // 2)
        first, last = median([r[0] for r in rows[:n]]), median([r[0] for r in rows[-n:]])
        # the machine drifts too (a shared VM): a fresh process that loads once, measured right after, is the yardstick
        print(f"  control: a fresh process, one load, {n} generations")
        fresh = median([r[0] for r in soak(path, other, mtp, args, n, reload=False)])
        print(f"last-{n}/first-{n} tok/s: {last / first:.3f} ({first:.1f} -> {last:.1f}); last-{n}/fresh process: "
              f"{last / fresh:.3f} ({fresh:.1f}); threads "
              f"{rows[0][1]} -> {rows[-1][1]} (max {max(r[1] for r in rows)}); RSS "
              f"{rows[0][2] / 2**20:.0f} -> {rows[-1][2] / 2**20:.0f} MiB "
              f"(+{(rows[-1][2] - rows[0][2]) / 2**20:.1f} MiB after cycle 1; anonymous "
              f"+{(rows[-1][3] - rows[0][3]) / 2**20:.1f} MiB, +{(rows[-1][3] - rows[n - 1][3]) / 2**20:.1f} MiB "
              f"after cycle {n})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
