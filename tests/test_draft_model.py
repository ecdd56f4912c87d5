"""draft-simple: a separate draft model (DraftModel) drafts for the target, verified like MTP's drafts.

Exactness is the test: greedy and seeded output with a draft model equals plain decoding, on SmolLM2 (a real
model, drafting for itself: high acceptance) and on the hybrid qwen35moe synthetic model with a random dense
draft (low acceptance: rejected drafts roll back the recurrent state). A draft of another vocabulary, or one
that cannot roll back, is refused before it drafts; over gRPC the refusal leaves the backend serving.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import smollm2_options
from synth_models import write_qwen3

from backend.core.errors import InvalidOptionError
from backend.core.gguf_file import read_gguf
from backend.engine.draft_model import DraftModel
from backend.engine.generation import GenerationRequest, Result
from backend.engine.llama import Engine, EngineConfig
from backend.engine.sampling import SamplingParams
from backend.engine.scheduler import Scheduler, Stream
from backend.engine.speculative import SpecConfig
from backend.proto import backend_pb2 as pb
from backend.service.options import plan_load

SEEDED = SamplingParams(temperature=0.9, top_k=40, top_p=0.95, seed=1234)
PROMPTS = ("<|im_start|>user\nWrite a short poem about the sea.<|im_end|>\n<|im_start|>assistant\n",
           "<|im_start|>user\nList three uses of copper.<|im_end|>\n<|im_start|>assistant\n")


@pytest.fixture(scope="module")
def qwen3_draft(tmp_path_factory) -> Path:
    """A random dense qwen3 of the tiny qwen35moe preset's vocabulary."""
    return write_qwen3(tmp_path_factory.mktemp("draft") / "draft-qwen3.gguf")


def _config(n_seq: int, n_draft_max: int = 0, n_rs_seq: int | None = None) -> EngineConfig:
    return EngineConfig(n_ctx=512, n_seq=n_seq, n_batch=128, n_threads=2, n_draft_max=n_draft_max, n_rs_seq=n_rs_seq)


def load(path: Path, draft: Path | None = None, *, n_seq: int = 2, n_max: int = 4) -> Scheduler:
    """Plain decoding, or draft-simple with a fixed draft length (so every step drafts)."""
    if draft is None:
        return Scheduler(Engine(path, _config(n_seq)), SpecConfig())
    spec = SpecConfig(n_max=n_max, adaptive=False)
    target = Engine(path, _config(n_seq, spec.n_draft_max(True), spec.n_rs_seq(True)))
    return Scheduler(target, spec, draft_model=DraftModel(Engine(draft, _config(n_seq)), target))


def run_together(s: Scheduler, prompts: list[list[int]], sampling: SamplingParams, n: int = 64) -> list[Result]:
    """The prompts as concurrent requests (each in its own slot, drafted in one batch)."""
    streams = [Stream().attach(s, GenerationRequest(prompt=p, max_tokens=n, sampling=sampling)) for p in prompts]
    s.run_until_idle()
    for st in streams:
        list(st.chunks())
    return [st.result for st in streams]


@pytest.mark.parametrize("sampling", [SamplingParams(), SEEDED], ids=["greedy", "seeded"])
def test_smollm2_drafting_for_itself_equals_plain(smollm2_path, sampling):
    plain, spec = load(smollm2_path), load(smollm2_path, smollm2_path)
    try:
        prompts = [plain.engine.tokenize(p) for p in PROMPTS]
        want = run_together(plain, prompts, sampling)
        got = run_together(spec, prompts, sampling)
        assert [r.token_ids for r in got] == [r.token_ids for r in want]
        for r in got:
            drafted, accepted = r.stats.by_origin["draft"]
            assert drafted == r.stats.drafted > 0 and "mtp" not in r.stats.by_origin
            assert accepted > 0
        if sampling.temperature == 0:  # the same weights agree with themselves, batched kernels aside
            assert sum(r.stats.accepted for r in got) >= 0.8 * sum(r.stats.drafted for r in got)
    finally:
        plain.close()
        spec.close()


def test_hybrid_target_rolls_back_a_random_drafts_rejections(synth_model, qwen3_draft):
    target = synth_model("predictable", acceptance=0.7, mtp=False)
    plain, spec = load(target), load(target, qwen3_draft, n_max=3)
    try:
        prompts = [plain.engine.tokenize("Hello"), plain.engine.tokenize("The sea")]
        for sampling in (SamplingParams(), SEEDED):
            want = run_together(plain, prompts, sampling, n=48)
            got = run_together(spec, prompts, sampling, n=48)
            assert [r.token_ids for r in got] == [r.token_ids for r in want]
            assert all(r.stats.by_origin["draft"][0] > r.stats.by_origin["draft"][1] for r in got)  # rejections
    finally:
        plain.close()
        spec.close()


def test_a_draft_of_another_vocabulary_or_with_recurrent_layers_is_refused(smollm2_path, qwen3_draft, synth_model):
    hybrid = synth_model("random", mtp=False)
    for target, draft, why in ((smollm2_path, qwen3_draft, "tokens and the model"),
                               (hybrid, hybrid, "recurrent layers")):
        t, d = Engine(target, _config(1)), Engine(draft, _config(1))
        try:
            with pytest.raises(InvalidOptionError, match=why):
                DraftModel(d, t)
        finally:
            t.close()
            d.close()


def test_plan_takes_draft_options_for_the_draft_model(smollm2_path, tmp_path):
    req = smollm2_options(smollm2_path, DraftModel=smollm2_path.name, Threads=2, NGPULayers=0,
                          Options=["draft_threads:1", "draft_cache_type_k:q8_0", "spec_n_max:5"])
    plan = plan_load(req, read_gguf(smollm2_path), smollm2_path)
    assert plan.draft_path == smollm2_path and plan.draft is not None
    assert (plan.draft.n_threads, plan.draft.type_k, plan.draft.type_v, plan.draft.mtp) == (1, "q8_0", "f16", False)
    assert (plan.draft.n_ctx, plan.draft.n_seq) == (plan.engine.n_ctx, plan.engine.n_seq)
    assert (plan.spec.n_max, plan.engine.n_draft_max, plan.engine.mtp) == (5, 5, False)
    assert "draft-model speculation on (n_max=5" in plan.mtp_reason
    with pytest.raises(InvalidOptionError, match="needs DraftModel"):
        plan_load(smollm2_options(smollm2_path, Options=["spec_type:draft-simple"]), read_gguf(smollm2_path),
                  smollm2_path)
    bad = tmp_path / "zero.gguf"
    bad.write_bytes(b"\0" * 64)
    with pytest.raises(Exception, match="zero.gguf"):
        plan_load(smollm2_options(smollm2_path, DraftModel=str(bad)), read_gguf(smollm2_path), smollm2_path)


def test_grpc_draft_model_is_exact_and_a_bad_one_leaves_the_backend_serving(backend, smollm2_path, qwen3_draft):
    stub = backend.stub

    def predict() -> pb.Reply:
        return stub.Predict(pb.PredictOptions(Prompt=PROMPTS[0], Tokens=48, Temperature=0.0), timeout=120)

    assert stub.LoadModel(smollm2_options(smollm2_path)).success
    want = predict()
    res = stub.LoadModel(smollm2_options(smollm2_path, DraftModel=smollm2_path.name,
                                         Options=["spec_n_max:4", "spec_adaptive:false"]))
    assert res.success and "draft-model speculation on" in res.message, res.message
    got = predict()
    assert got.message == want.message and got.draft_n > 0 and got.draft_n_accepted > 0
    assert stub.Status(pb.HealthMessage()).memory.breakdown["draft_model_weights"] > 0
    refused = stub.LoadModel(smollm2_options(smollm2_path, DraftModel=str(qwen3_draft)))
    assert not refused.success and "vocabulary" in refused.message, refused.message
    assert stub.Health(pb.HealthMessage()).message == b"OK"
