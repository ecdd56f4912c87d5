"""HTTP-over-gRPC vs gRPC vs in-process generation speed on the same model, measured side by side in one run.

Three layers of the same generation (same LoadModel options, greedy, a fixed number of tokens):

* in-process: `backend.engine.scheduler.Scheduler` on an `Engine` in this process (what the servicer wraps);
* gRPC: the backend started as LocalAI starts it (`run.sh --addr`), PredictStream read by this process;
* HTTP: `apexmtp run` as a subprocess (its own backend behind it), `/v1/completions` streamed over SSE.

Every layer is timed the same way, at its consumer: decode tok/s = (tokens - 1) / (last text - first text), and
end-to-end ms from sending the request to its last byte. Rounds interleave the layers so machine noise hits them
alike; medians are printed with the ratios HTTP / in-process, gRPC / in-process and HTTP / gRPC.

    python bench/bench_http.py [--models demo,demo-mtp] [--tokens 256] [--rounds 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, median, sse_completion

from backend.api.models import RunOptions, prepare
from backend.api.supervisor import Backend, free_port
from backend.core.gguf_file import read_gguf
from backend.core.process import stop_process
from backend.engine.generation import GenerationRequest
from backend.engine.llama import Engine
from backend.engine.sampling import SamplingParams
from backend.engine.scheduler import Scheduler, Stream, llama_thread
from backend.proto import backend_pb2 as pb
from backend.service.options import plan_load

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."
CONTEXT = 1024

Sample = tuple[float, float]  # (decode tok/s, end-to-end ms)


def rate(n: int, first: float | None, last: float | None) -> float:
    return (n - 1) / (last - first) if first is not None and last is not None and last > first and n > 1 else 0.0


def timed(events: Iterable[tuple[bool, int]]) -> Sample:
    """Time a stream of (has_text, tokens so far) events at the consumer."""
    t0 = time.perf_counter()
    first = last = None
    n = 0
    for has_text, tokens in events:
        now = time.perf_counter()
        if has_text:
            first = now if first is None else first
            last = now
        n = max(n, tokens)
    return rate(n, first, last), (time.perf_counter() - t0) * 1000


def inproc_events(model: Scheduler, tokens: int) -> Iterable[tuple[bool, int]]:
    prompt = model.engine.tokenize(PROMPT, add_special=True, parse_special=True)
    req = GenerationRequest(prompt=prompt, sampling=SamplingParams(), max_tokens=tokens, ignore_eos=True)
    stream = Stream().attach(model, req)
    for chunk in stream.chunks():
        yield bool(chunk.content), stream.ticket.result.n_tokens


def grpc_events(backend: Backend, tokens: int) -> Iterable[tuple[bool, int]]:
    for reply in backend.stub.PredictStream(pb.PredictOptions(Prompt=PROMPT, Tokens=tokens, IgnoreEOS=True)):
        yield bool(reply.message), reply.tokens


def http_events(port: int, tokens: int) -> Iterable[tuple[bool, int]]:
    # Plain greedy like the other layers: no top-k/top-p/min-p stages (the server would add its defaults).
    body = {"prompt": PROMPT, "max_tokens": tokens, "ignore_eos": True, "temperature": 0, "top_k": 0,
            "top_p": 1.0, "min_p": 0}
    for chunk in sse_completion(port, body, timeout=600):
        yield any(c.get("text") for c in chunk.get("choices", [])), chunk.get("usage", {}).get("completion_tokens", 0)


class HttpServer:
    """`apexmtp run REF --port P` as a subprocess, ready once /health answers."""

    def __init__(self, ref: str, threads: int, env: dict[str, str]) -> None:
        self.port = free_port()
        self.log = tempfile.TemporaryFile()  # noqa: SIM115 (closed in stop())
        cmd = [sys.executable, "-m", "backend.cli", "run", ref, "--port", str(self.port), "--context", str(CONTEXT),
               "--threads", str(threads), "--quiet"]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **env}, stdout=self.log,
                                     stderr=subprocess.STDOUT)
        for _ in range(1200):
            if self.proc.poll() is not None:
                self.log.seek(0)
                raise SystemExit(f"apexmtp run exited:\n{self.log.read().decode()}")
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
            try:
                conn.request("GET", "/health")
                if conn.getresponse().status == 200:
                    return
            except OSError:
                pass
            finally:
                conn.close()
            time.sleep(0.1)
        raise SystemExit("apexmtp run did not become healthy")

    def stop(self) -> None:
        stop_process(self.proc, 30)
        self.log.close()


def bench_model(ref: str, args: argparse.Namespace) -> dict[str, list[Sample]]:
    """Interleaved rounds of the three layers on demo `ref` (or any REF `apexmtp run` takes)."""
    load, _ = prepare(RunOptions(ref=ref, context=CONTEXT, threads=args.threads, progress=False))
    path = Path(load.ModelFile)
    plan = plan_load(load, read_gguf(path), path)
    local = Scheduler(Engine(path, plan.engine), plan.spec, name="local")
    llama_thread().submit(local.run)  # chunks arrive as a server would send them
    backend = Backend(echo=False)
    http_server = None
    try:
        backend.wait_healthy()
        backend.load(load)
        http_server = HttpServer(ref, args.threads, {})
        layers: dict[str, Callable[[int], Iterable[tuple[bool, int]]]] = {
            "in-process": lambda n: inproc_events(local, n),
            "gRPC": lambda n: grpc_events(backend, n),
            "HTTP (SSE)": lambda n: http_events(http_server.port, n),
        }
        for events in layers.values():
            timed(events(16))  # warm-up
        samples: dict[str, list[Sample]] = {name: [] for name in layers}
        for _ in range(args.rounds):
            for name, events in layers.items():
                samples[name].append(timed(events(args.tokens)))
        return samples
    finally:
        if http_server is not None:
            http_server.stop()
        backend.stop()
        local.close()


def report(ref: str, samples: dict[str, list[Sample]]) -> dict[str, float]:
    tps = {name: median([s[0] for s in v]) for name, v in samples.items()}
    ms = {name: median([s[1] for s in v]) for name, v in samples.items()}
    base = tps["in-process"]
    print(f"\n## {ref}")
    print(f"{'layer':<12} {'decode tok/s':>12} {'e2e ms':>9} {'vs in-process':>14}")
    for name in samples:
        print(f"{name:<12} {tps[name]:>12.1f} {ms[name]:>9.1f} {tps[name] / base if base else 0:>14.3f}")
    ratios = {"grpc_over_inprocess": tps["gRPC"] / base, "http_over_inprocess": tps["HTTP (SSE)"] / base,
              "http_over_grpc": tps["HTTP (SSE)"] / tps["gRPC"] if tps["gRPC"] else 0.0}
    print(f"HTTP / in-process {ratios['http_over_inprocess']:.3f}   gRPC / in-process "
          f"{ratios['grpc_over_inprocess']:.3f}   HTTP / gRPC {ratios['http_over_grpc']:.3f}")
    return {**{f"tps_{k}": v for k, v in tps.items()}, **{f"ms_{k}": v for k, v in ms.items()}, **ratios}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="demo,demo-mtp", help="comma-separated REFs (default: the two demos)")
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, help="also write the medians and ratios here")
    args = ap.parse_args()
    print(f"# machine: {machine()}")
    print(f"# {args.tokens} tokens, greedy, ignore_eos, {args.threads} threads, context {CONTEXT}, "
          f"median of {args.rounds} interleaved rounds")
    results = {ref: report(ref, bench_model(ref, args)) for ref in args.models.split(",")}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"machine": machine(), "args": vars(args) | {"json": str(args.json)},
                                         "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
