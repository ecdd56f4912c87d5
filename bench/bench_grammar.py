"""What a grammar costs in decode speed: the same prompt decoded free and constrained, rounds interleaved.

Models: the `demo` (SmolLM2-135M, 49k vocabulary) and `demo-mtp` (synthetic qwen35moe with an MTP head, MTP on).
Grammars never complete, so every run makes exactly --tokens tokens (a completed grammar would end generation):

* `json` — an open-ended JSON array of objects from a JSON schema (`backend.service.grammars`), strings and all;
* `tool` — Hermes tool calls, one after another, from `tool_call_grammar`, the grammar `tool_choice: required` uses;
* `lazy` — the tool grammar under `auto`, waiting for a trigger the model never writes: the cost of the trigger
  check alone.

Every run biases end-of-generation tokens by -100 so the free and lazy runs reach the same length; greedy. Besides
tok/s (wall clock) the table gives the process's CPU milliseconds per token, which other load on a shared machine
disturbs far less (run with --threads 1 for that figure to be the work itself).

    python bench/bench_grammar.py [--tokens 128] [--rounds 3] [--threads 0]
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, median

from backend.api.demo import DEMOS, demo_path
from backend.engine.generation import GenerationRequest
from backend.engine.llama import Engine, EngineConfig
from backend.engine.sampling import SamplingParams
from backend.engine.scheduler import Scheduler, collect
from backend.engine.speculative import SpecConfig
from backend.service.grammars import schema_grammar, tool_call_grammar, trigger_patterns
from backend.service.tools import HERMES

ITEM = {"type": "object", "additionalProperties": False, "required": ["name", "age", "tags"],
        "properties": {"name": {"type": "string"}, "age": {"type": "integer", "minimum": 0, "maximum": 150},
                       "tags": {"type": "array", "items": {"type": "string"}}}}
TOOLS = [{"type": "function", "function": {"name": "search", "parameters": {
    "type": "object", "required": ["query"], "properties": {"query": {"type": "string"}, "limit": {"type": "integer"}}}}}]


def never_ending(grammar: str, item: str) -> str:
    """`grammar` with its root replaced by an endless sequence of `item`."""
    rules = [line for line in grammar.splitlines() if line and not line.startswith("root ::=")]
    return "\n".join([f'root ::= "[" space {item} ("," space {item})* never', 'never ::= "\\u0001" never', *rules])


def grammars() -> dict[str, SamplingParams]:
    json_g = schema_grammar({"type": "array", "items": ITEM})
    item = next(line.split(" ::= ")[0] for line in json_g.splitlines() if line.startswith("root-item ::="))
    tool = tool_call_grammar(HERMES, TOOLS).replace('root ::= call ("\\n" call)*', 'root ::= call ("\\n" call)* never')
    tool += 'never ::= "\\u0001" never\n'
    return {"free": SamplingParams(), "json": SamplingParams(grammar=never_ending(json_g, item)),
            "tool": SamplingParams(grammar=tool),
            "lazy": SamplingParams(grammar=tool, grammar_triggers=tuple(trigger_patterns(["<tool_call>"])))}


def measure(model: Scheduler, prompt: list[int], sampling: SamplingParams, tokens: int
            ) -> tuple[float, float, float, int]:
    """(tok/s, CPU ms per generated token, draft acceptance, tokens)."""
    model.engine.reset()
    sampling = replace(sampling, logit_bias={t: -100.0 for t in model.eog_tokens})  # finite: grammars may end
    cpu = time.process_time()
    r = collect(model, GenerationRequest(prompt=prompt, sampling=sampling, max_tokens=tokens))
    cpu_ms = 1000.0 * (time.process_time() - cpu) / max(r.n_tokens, 1)
    return r.tokens_per_second, cpu_ms, r.stats.acceptance_rate, r.n_tokens


def bench(name: str, model: Scheduler, args: argparse.Namespace) -> None:
    prompt = model.engine.tokenize("List some people as JSON, with their names, ages and tags. " * 3)
    configs = grammars()
    for sampling in configs.values():  # warm-up
        measure(model, prompt, sampling, 16)
    samples: dict[str, list[tuple[float, float, float, int]]] = {k: [] for k in configs}
    for _ in range(args.rounds):
        for key, sampling in configs.items():
            samples[key].append(measure(model, prompt, sampling, args.tokens))
    free = [median([s[i] for s in samples["free"]]) for i in (0, 1)]
    print(f"\n## {name} (vocabulary {model.engine.n_vocab})")
    print(f"{'grammar':<8} {'tok/s':>8} {'x free':>7} {'CPU ms/tok':>10} {'x free':>7} {'accept':>7} {'tokens':>7}")
    for key, runs in samples.items():
        tps, cpu = (median([s[i] for s in runs]) for i in (0, 1))
        print(f"{key:<8} {tps:8.1f} {tps / free[0]:7.2f} {cpu:10.2f} {cpu / free[1]:7.2f} "
              f"{median([s[2] for s in runs]):7.1%} {min(s[3] for s in runs):7d}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    print(f"# machine: {machine()}")
    print(f"# {args.tokens} greedy tokens per run, median of {args.rounds} interleaved rounds")
    base = EngineConfig(n_ctx=1024, n_batch=256, n_threads=args.threads)
    smol = Scheduler(Engine(demo_path("demo"), base), SpecConfig(), name="demo")
    bench("demo: SmolLM2-135M, plain decoding", smol, args)
    smol.close()
    n_draft = DEMOS["demo-mtp"].synth["n_draft"]
    for adaptive in (False, True):  # the demo's fixed k, and the adaptive default of real models
        mtp = Scheduler(Engine(demo_path("demo-mtp"), replace(base, mtp=True, n_draft_max=n_draft)),
                        SpecConfig(n_max=n_draft, adaptive=adaptive), name="demo-mtp")
        bench(f"demo-mtp: synthetic qwen35moe, MTP {'adaptive k' if adaptive else f'k={n_draft}'}", mtp, args)
        mtp.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
