"""apexmtp's engine vs llama-server's draft-mtp on the same GGUF and machine, interleaved rounds (every other one
reversed, so drift during the run favours no configuration).

llama-server is not shipped with llama-cpp-python; build it from the same vendored llama.cpp
(`cmake -B build -DLLAMA_CURL=OFF && cmake --build build --target llama-server`) and pass its path.

    python bench/bench_llama_server.py --server PATH/llama-server [--model F.gguf] [--k 4] [--tokens 128]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_mtp import model_file
from common import Server, llama_completion, llama_server_cmd, llama_server_spec, machine, median

from backend.api.supervisor import free_port
from backend.engine.generation import GenerationRequest
from backend.engine.llama import Engine, EngineConfig
from backend.engine.scheduler import Scheduler, collect
from backend.engine.speculative import SpecConfig

PROMPT = "Benchmarking speculative decoding on a synthetic model. " * 4


def ours(model: Scheduler, tokens: int) -> tuple[float, float]:
    model.engine.reset()
    r = collect(model, GenerationRequest(prompt=model.engine.tokenize(PROMPT), max_tokens=tokens, ignore_eos=True))
    return r.tokens_per_second, r.stats.acceptance_rate


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--server", type=Path, required=True)
    ap.add_argument("--model", type=Path, default=None, help="default: the bench preset at 100%% acceptance")
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    path = args.model or model_file("bench", 1.0, args.k)
    base = dict(n_ctx=2048, n_batch=256, n_threads=args.threads)
    runs = {
        "apexmtp plain": lambda: Scheduler(Engine(path, EngineConfig(**base)), SpecConfig(), name="p"),
        f"apexmtp k={args.k}": lambda: Scheduler(Engine(path, EngineConfig(**base, mtp=True, n_draft_max=args.k)),
                                                 SpecConfig(n_max=args.k, adaptive=False), name="m"),
        "apexmtp adaptive": lambda: Scheduler(Engine(path, EngineConfig(**base, mtp=True, n_draft_max=6)),
                                              SpecConfig(n_max=6), name="a"),
    }

    def theirs(k: int | None) -> Callable[[], tuple[float, float]]:
        def measure() -> tuple[float, float]:
            port = free_port()
            spec = llama_server_spec(SpecConfig(n_max=k or 0), "draft-mtp")
            srv = Server("llama-server", llama_server_cmd(args.server, path, port, args.threads, 2048, 256, extra=spec),
                         port)
            try:
                llama_completion(port, PROMPT, 32)
                return llama_completion(port, PROMPT, args.tokens)[:2]
            finally:
                srv.stop()
        return measure

    def in_process(make: Callable[[], Scheduler]) -> Callable[[], tuple[float, float]]:
        def measure() -> tuple[float, float]:
            m = make()
            try:
                ours(m, 32)
                return ours(m, args.tokens)
            finally:
                m.close()
        return measure

    configs = [(name, in_process(make)) for name, make in runs.items()] + [
        ("llama-server plain", theirs(None)), (f"llama-server draft-mtp k={args.k}", theirs(args.k))]
    results: dict[str, list[tuple[float, float]]] = {name: [] for name, _ in configs}
    for r in range(args.rounds):  # one process at a time so they never compete for the 2 cores
        # Every other round runs the configurations in reverse, so a machine that speeds up or slows down during
        # the run does not favour whichever comes first.
        for name, measure in configs if r % 2 == 0 else configs[::-1]:
            results[name].append(measure())
    print(f"# machine: {machine()}")
    print(f"# model {path.name} ({path.stat().st_size / 2**20:.0f} MiB), {args.tokens} greedy tokens, "
          f"{args.threads} threads, median of {args.rounds} rounds")
    ref = median([r[0] for r in results["llama-server plain"]])
    for name, rs in results.items():
        tps = median([r[0] for r in rs])
        print(f"{name:<28} {tps:8.1f} tok/s  {tps / ref:5.2f}x  acceptance {median([r[1] for r in rs]):.1%}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
