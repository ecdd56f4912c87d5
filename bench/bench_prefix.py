"""Prompt reuse on a hybrid model: `apexmtp run` vs `llama-server` (its checkpoint and cache-ram defaults).

Both servers serve the same qwen35moe file (recurrent Gated-DeltaNet layers + attention + MTP head, the bench
preset) with MTP on, and every case is timed as the time to first token of a streamed completion, divided by
that server's cold prefill of a prompt of the same size:

- cold: a prompt no cache holds;
- same: the same prompt again;
- extension: the prompt plus a new tail (a chat's next turn);
- rewritten: the last 10% of the prompt replaced (an agent rewriting its tool results);
- after eviction: the prompt again after as many other long prompts as there are slots used every slot;
- a 6-turn chat through a Qwen3.5-style thinking template, which drops each answer's reasoning from the history
  (so every turn's prompt diverges from what the slot holds where the previous answer began): per turn, total.

With `--restart`, apexmtp is also timed across a restart with `--prompt-cache DIR`: the prompt cold, the server
stopped and started again, the prompt again.

    python bench/bench_prefix.py --server PATH/llama-server [--sizes 2000,8000] [--parallel 1,4] [--restart]
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_mtp import model_file
from common import Server, llama_server_cmd, llama_server_spec, machine, sse_completion

from backend.api.supervisor import free_port
from backend.engine.speculative import SpecConfig

WORDS = ("alpha beta gamma delta epsilon zeta theta kappa lambda sigma omega river stone cloud light field "
         "tool result file line value error build test query answer").split()


TOKENS_PER_WORD = 1.0  # measured on the model's tokenizer in main()


def words(n_tokens: int, seed: int) -> str:
    """Random text of about `n_tokens` tokens."""
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) + str(rng.randrange(100)) for _ in range(max(1, round(n_tokens / TOKENS_PER_WORD))))


def measure_tokens_per_word(model: Path) -> float:
    from backend.engine.llama import Engine, EngineConfig

    engine = Engine(model, EngineConfig(n_ctx=64))
    try:
        return len(engine.tokenize(words(2000, 0), add_special=False)) / 2000
    finally:
        engine.close()


def ttft(server: Server, prompt: str, tokens: int = 1) -> tuple[float, str, dict]:
    """Seconds to the first token of a greedy streamed completion, the text, and the final timings."""
    body = {"prompt": prompt, "max_tokens": tokens, "n_predict": tokens, "temperature": 0, "top_k": 0, "top_p": 1.0,
            "min_p": 0, "cache_prompt": True}
    t0 = time.perf_counter()
    first, text, timings = None, [], {}
    for chunk in sse_completion(server.port, body):
        for c in chunk.get("choices", []):
            if c.get("text"):
                first = first or time.perf_counter()
                text.append(c["text"])
        timings = chunk.get("timings", timings)
    return (first or time.perf_counter()) - t0, "".join(text), timings


def start(name: str, model: Path, args: argparse.Namespace, parallel: int, extra: list[str] | None = None) -> Server:
    port = free_port()
    context = args.context
    if name == "apexmtp":
        cmd = [sys.executable, "-m", "backend.cli", "run", str(model), "--port", str(port), "--parallel",
               str(parallel), "--context", str(context), "--threads", str(args.threads), "--quiet", *(extra or [])]
    else:
        cmd = llama_server_cmd(args.server, model, port, args.threads, context * parallel, 512, parallel,
                               llama_server_spec(SpecConfig(n_max=4), "draft-mtp"))
    return Server(name, cmd, port)


def chat_turns(server: Server, system: str, turns: int, seed: int) -> list[float]:
    """A thinking chat rendered as Qwen3.5's template does: the history keeps each answer without its reasoning."""
    history: list[tuple[str, str]] = []
    out = []
    for turn in range(turns):
        user = words(60, seed * 100 + turn)
        prompt = f"<|im_start|>system\n{system}<|im_end|>\n" + "".join(
            f"<|im_start|>user\n{u}<|im_end|>\n<|im_start|>assistant\n{a}<|im_end|>\n" for u, a in history)
        prompt += f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n<think>\n"
        t, text, _ = ttft(server, prompt, 48)
        out.append(t)
        half = text.split(" ")
        history.append((user, " ".join(half[len(half) // 2:])))  # the first half stands for the dropped reasoning
    return out


def cases(server: Server, size: int, parallel: int, seed: int) -> dict[str, float]:
    base = words(size, seed)
    cut = base.split(" ")
    t_cold, _, _ = ttft(server, base)
    res = {"cold": t_cold}
    res["same"] = ttft(server, base)[0]
    res["extension"] = ttft(server, base + " " + words(size // 20, seed + 1))[0]
    rewritten = " ".join(cut[:int(len(cut) * 0.9)]) + " " + words(size // 10, seed + 2)
    res["rewritten"] = ttft(server, rewritten)[0]
    ttft(server, base)  # the slot holds the prompt again
    for i in range(parallel):
        ttft(server, words(size, seed + 10 + i))
    res["after eviction"] = ttft(server, base)[0]
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--server", type=Path, help="llama-server binary (omit to time apexmtp alone)")
    ap.add_argument("--sizes", default="2000", help="prompt sizes in tokens")
    ap.add_argument("--parallel", default="1", help="slot counts to run, e.g. 1,4")
    ap.add_argument("--context", type=int, default=4096, help="context per slot")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--turns", type=int, default=6)
    ap.add_argument("--restart", action="store_true", help="also time apexmtp across a restart with --prompt-cache")
    args = ap.parse_args()
    model = model_file("bench", 1.0, 4)
    global TOKENS_PER_WORD
    TOKENS_PER_WORD = measure_tokens_per_word(model)
    print(f"# machine: {machine()}")
    print(f"# model: {model.name} ({model.stat().st_size / 2**20:.0f} MiB, bench preset: 16 GDN/attention layers "
          f"+ MTP head), MTP on in both servers, {args.threads} threads; time to first token in seconds (x cold)")
    names = ["apexmtp"] + (["llama-server"] if args.server else [])
    for parallel in [int(p) for p in args.parallel.split(",")]:
        for size in [int(s) for s in args.sizes.split(",")]:
            results, chats = {}, {}
            for name in names:
                server = start(name, model, args, parallel)
                try:
                    ttft(server, words(50, 999))  # warm-up: weights paged in, graphs built
                    results[name] = cases(server, size, parallel, seed=size + parallel)
                    chats[name] = chat_turns(server, words(size // 2, 7), args.turns, seed=size)
                finally:
                    server.stop()
            print(f"\n## {parallel} slot(s), prompt of ~{size} tokens")
            print(f"{'case':<16}" + "".join(f"{n:>22}" for n in names))
            for case in results[names[0]]:
                row = f"{case:<16}"
                for n in names:
                    t, cold = results[n][case], results[n]["cold"]
                    row += f"{t:>12.2f} s ({t / cold:4.2f}x)" if case != "cold" else f"{t:>12.2f} s        "
                print(row)
            print(f"{'thinking chat':<16}" + "".join(f"{sum(chats[n]):>12.2f} s total  " for n in names))
            for i in range(args.turns):
                print(f"{'  turn ' + str(i + 1):<16}" + "".join(f"{chats[n][i]:>12.2f} s        " for n in names))
    if args.restart:
        size = int(args.sizes.split(",")[0])
        with tempfile.TemporaryDirectory() as d:
            base = words(size, 4242)
            server = start("apexmtp", model, args, 1, ["--prompt-cache", d])
            try:
                ttft(server, words(50, 999))
                cold = ttft(server, base)[0]
            finally:
                server.stop()
            server = start("apexmtp", model, args, 1, ["--prompt-cache", d])
            try:
                again = ttft(server, base)[0]
            finally:
                server.stop()
        print(f"\n## apexmtp across a restart with --prompt-cache (~{size} tokens): cold {cold:.2f} s, "
              f"after restart {again:.2f} s ({again / cold:.2f}x)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
