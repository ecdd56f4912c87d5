"""A backend that stays the same for hours: reloads leave no llama.cpp object, thread or slot behind.

Not a timed test: it counts what a reload must give back (llama.cpp objects by kind, as the backend reports them
in Status, and the process's threads) over many LoadModel / generate / Free cycles, the way LocalAI drives a
backend (model switches, Free, reload over a loaded model). bench/bench_soak.py measures the speed side.
"""

from __future__ import annotations

import psutil
from conftest import BackendProcess, smollm2_options

from backend.engine.llamalog import LIVE
from backend.proto import backend_pb2 as pb


def _live(stub) -> dict[str, int]:
    bd = stub.Status(pb.HealthMessage()).memory.breakdown
    return {k: v for k, v in bd.items() if k.startswith("live_") and v}


def test_reload_cycles_leave_nothing_behind(synth_model, smollm2_path):
    mtp_model = synth_model("predictable", acceptance=0.7)
    plain_model = synth_model("random", mtp=False)
    b = BackendProcess()
    try:
        stub = b.stub
        proc = psutil.Process(b.proc.pid)  # run.sh execs the interpreter: same process
        loads = [
            (pb.ModelOptions(ModelFile=str(mtp_model), ContextSize=512, Threads=2, Options=["parallel:2"]), 2),
            (pb.ModelOptions(ModelFile=str(plain_model), ContextSize=512, Threads=2, Options=["parallel:3"]), 1),
            (smollm2_options(smollm2_path, Embeddings=True, Options=["parallel:2"]), 1),
        ]
        threads = []
        for cycle in range(15):
            options, contexts = loads[cycle % 3]
            if cycle % 2:
                assert stub.Free(pb.HealthMessage()).success
                assert _live(stub) == {}  # nothing of the previous model survives a Free
            assert stub.LoadModel(options).success
            replies = list(stub.PredictStream(pb.PredictOptions(Prompt=f"cycle {cycle}", Tokens=12, IgnoreEOS=True)))
            assert replies[-1].tokens == 12
            if options.Embeddings:
                assert stub.Embedding(pb.PredictOptions(Embeddings="and an embedding")).embeddings
            live = _live(stub)
            # one model; target (+ MTP) context, and the embeddings context once it was used; no sampler left
            assert live.get("live_model") == 1 and "live_sampler" not in live
            assert live["live_context"] == contexts + (1 if options.Embeddings else 0)
            threads.append(proc.num_threads())
        # after a warm-up (gRPC's and asyncio's own pools start lazily) the thread count stays put
        assert max(threads[5:]) == threads[5], threads
        assert stub.Free(pb.HealthMessage()).success and _live(stub) == {}
    finally:
        b.stop()


def test_evaluate_frees_every_tier(synth_model):
    """The quantizer's evaluate loads a source and every candidate in one process: all freed again."""
    from quantizer.evaluate import evaluate

    path = synth_model("predictable", acceptance=0.7)
    before = +LIVE
    evaluate(path, [path, path], "some text to score " * 80, n_ctx=64, n_chunks=2, mtp_ks=(1, 2), mtp_prompts=1)
    assert +LIVE == before
