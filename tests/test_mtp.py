"""MTP self-speculative decoding: exact (every token is the target's own choice), adaptive, observable.

Predictable synthetic models have clear top-1 margins, so there MTP output must equal plain output token for
token, greedy and seeded. Random-weight models only get the first property (mtp-engine.md §6).
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import BackendProcess, synth_options

from backend.core.errors import ModelLoadError
from backend.engine.generation import GenerationRequest, Result
from backend.engine.llama import Engine, EngineConfig, expert_pattern
from backend.engine.sampling import SamplingParams
from backend.engine.scheduler import Scheduler, Stream, collect
from backend.engine.speculative import Acceptance, DraftController, SpecConfig, greedy_pick
from backend.proto import backend_pb2 as pb
from backend.synth.qwen35moe import read_synth_info

CTX = dict(n_ctx=1024, n_batch=64, n_ubatch=64, n_threads=2)
SEEDED = SamplingParams(temperature=0.9, top_k=40, top_p=0.95, seed=1234)


def load(path, *, n_max=0, adaptive=False, **kw) -> Scheduler:
    cfg = EngineConfig(**{**CTX, **kw}, mtp=n_max > 0, n_draft_max=n_max)
    return Scheduler(Engine(path, cfg), SpecConfig(n_max=n_max, adaptive=adaptive))


@pytest.fixture(scope="module")
def p95(synth_model):
    return synth_model("predictable", acceptance=0.95)


@pytest.fixture(scope="module")
def p50(synth_model):
    return synth_model("predictable", acceptance=0.5)


def run(s: Scheduler, prompt: list[int], n: int = 96, sampling: SamplingParams = SamplingParams(), **kw) -> Result:
    return collect(s, GenerationRequest(prompt=prompt, max_tokens=n, sampling=sampling, **kw))


@pytest.mark.parametrize("sampling", [SamplingParams(), SEEDED], ids=["greedy", "seeded"])
@pytest.mark.parametrize("n_max,adaptive", [(1, False), (3, False), (6, False), (6, True)])
def test_mtp_equals_plain_on_clear_margins(p50, sampling, n_max, adaptive):
    plain, mtp = load(p50), load(p50, n_max=n_max, adaptive=adaptive)
    prompt = plain.engine.tokenize("Speculation must never change the output.")
    want = run(plain, prompt, 120, sampling)
    got = run(mtp, prompt, 120, sampling)
    assert got.token_ids == want.token_ids
    if not adaptive:
        assert got.stats.drafted > 0 and 0 < got.stats.accepted < got.stats.drafted  # partial accepts, rollbacks


def test_counts_match_the_models_own_prediction(p95):
    info = read_synth_info(p95)
    m = load(p95, n_max=3)
    prompt = m.engine.tokenize("Hello world")
    r = run(m, prompt, 128)
    assert r.token_ids == info.continuation(prompt[-1], 128)
    assert (r.stats.drafted, r.stats.accepted) == info.speculate(prompt[-1], 128, 3)


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
    for s in (plain, mtp):
        r = run(s, prompt, 80, stop=(stop,))
        assert r.content == full[: full.index(stop)] and r.finish_reason == "stop"
        r = run(s, prompt, 17)
        assert r.n_tokens == 17 and r.finish_reason == "length"
    # Prefix reuse after partial generations keeps the two engines in step.
    assert run(mtp, prompt, 80).content == run(plain, prompt, 80).content == full


def test_cancel_midway_then_exact_again(p50):
    plain, mtp = load(p50), load(p50, n_max=4)
    prompt = plain.engine.tokenize("Cancel me.")
    want = run(plain, prompt, 60).content
    stream = Stream().attach(mtp, GenerationRequest(prompt=prompt, max_tokens=60))
    for _ in range(3):
        mtp.step()
    chunks = stream.chunks()
    next(chunks)
    chunks.close()  # leaving early cancels the request: the slot is free at the next step
    mtp.run_until_idle()
    assert mtp.busy_slots == 0 and stream.ticket.cancelled
    assert run(mtp, prompt, 60).content == want


def test_every_token_is_the_targets_choice_on_random_weights(synth_model):
    """Random weights: batched and single-token kernels differ by ~1e-3, so compare with the verify logits."""
    path = synth_model("random", seed=7)
    mtp = load(path, n_max=4)
    prompt = mtp.engine.tokenize("random weights")
    stream = Stream().attach(mtp, GenerationRequest(prompt=prompt, max_tokens=64, logprobs=1))
    mtp.run_until_idle()
    entries = [lp for chunk in stream.chunks() for lp in chunk.logprobs]
    assert len(entries) == stream.result.n_tokens == len(stream.result.token_ids)
    # Greedy: each emitted token is the top-1 of the very row the target verified it on.
    assert all(e["token"] == e["top_logprobs"][0]["token"] for e in entries)


def test_no_head_falls_back_and_engine_refuses(tiny_nomtp_gguf):
    with pytest.raises(ModelLoadError, match="no nextn"):
        Engine(tiny_nomtp_gguf, EngineConfig(**CTX, mtp=True, n_draft_max=3))


def _drive(c: DraftController, slots: list[Acceptance], accept: float, cost, steps: int = 200) -> None:
    for _ in range(steps):
        k = c.choose(slots, 6)
        for a in slots:
            a.observe(k, round(k * accept))
        c.observe(len(slots), k, cost(len(slots), k))


def test_adaptive_controller_prefers_plain_when_drafts_fail():
    c = DraftController(6)
    slots = [c.new_slot()]
    _drive(c, slots, 0.0, lambda n, k: 1.0 + 1.0 * k)  # never accepted; each draft costs as much as a verify
    assert c.best_k(slots, 6) == 0 and slots[0].rate[0] < 0.5


def test_adaptive_controller_goes_long_when_drafts_win():
    c = DraftController(6)
    slots = [c.new_slot() for _ in range(4)]
    _drive(c, slots, 1.0, lambda n, k: 1.0 + 0.05 * n * k)  # cheap drafts, all accepted
    assert c.best_k(slots, 6) == 6 and all(a.rate[0] > 0.9 for a in slots)


def test_greedy_pick_judges_p_min_as_the_full_top_10_does():
    """The draft judgement (llama.cpp's: top-1 probability over the top-10 softmax >= p_min) from a shortcut that
    skips the full-vocabulary partition: the same token and verdict on flat and peaked rows alike."""
    rng = np.random.default_rng(0)
    for scale in (0.5, 3.0, 10.0, 40.0, 200.0):
        for _ in range(50):
            row = (rng.standard_normal(4096) * scale).astype(np.float32)
            top = np.argpartition(row, -10)[-10:]
            p_top1 = 1.0 / float(np.exp(row[top] - row.max()).sum())
            for p_min in (0.0, 0.3, 0.75, 0.95):
                assert greedy_pick(row, p_min) == (int(np.argmax(row)), p_top1 >= p_min)
    row = np.zeros(4096, np.float32)
    row[7] = np.nan
    assert greedy_pick(row, 0.0) == (7, False) and greedy_pick(row, 0.75) == (7, False)  # never a NaN draft
    assert greedy_pick(np.full(4096, -np.inf, np.float32), 0.75)[1] is False


def test_controller_step_costs_fill_untried_k_with_the_least_squares_line():
    c = DraftController(6)
    assert c.costs(1, 3) == [1.0] * 4  # nothing timed yet
    c.observe(1, 2, 0.5)
    assert c.costs(1, 3) == [0.5] * 4  # one point: its time for every k
    for k, t in ((0, 0.010), (1, 0.021), (6, 0.049)):
        c.observe(1, k, t)
    slope, intercept = np.polyfit([0, 1, 2, 6], [0.010, 0.021, 0.5, 0.049], 1)
    got = c.costs(1, 6)
    assert got[:3] == [0.010, 0.021, 0.5] and got[6] == 0.049  # measured k keep their own times
    assert got[3:6] == pytest.approx([max(intercept + slope * k, 1e-9) for k in (3, 4, 5)])
    assert c.costs(4, 2) == [1.0] * 3  # another slot count has its own table


def test_controller_fixed_k_respects_cap_and_new_slots_inherit_acceptance():
    c = DraftController(6, adaptive=False)
    assert [c.choose([c.new_slot()], cap) for cap in (9, 3, 1, 0)] == [6, 3, 1, 0]
    for _ in range(50):
        c.observe_acceptance(4, 1)  # only the first draft is ever kept
    fresh = c.new_slot()
    assert fresh.rate[0] > 0.9 and fresh.rate[1] < 0.1


# ------------------------------------------------------------------------------------------ over gRPC


@pytest.fixture(scope="module")
def mtp_backend():
    b = BackendProcess()
    yield b
    b.stop()


def test_grpc_mtp_exact_stats_and_memory(mtp_backend, p50):
    stub = mtp_backend.stub
    req = dict(Prompt="over the wire", Tokens=64, Temperature=0.0)
    res = stub.LoadModel(synth_options(p50, ["spec_type:none"]))
    assert res.success and "plainly" in res.message
    plain = stub.Predict(pb.PredictOptions(**req)).message
    res = stub.LoadModel(synth_options(p50, ["spec_type:draft-mtp", "spec_n_max:4", "spec_adaptive:false"]))
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
    res = stub.LoadModel(synth_options(p95, []))
    assert res.success and "MTP self-speculation on" in res.message
    res = stub.LoadModel(synth_options(tiny_nomtp_gguf, ["spec_type:draft-mtp"]))
    assert res.success and "no MTP head" in res.message  # falls back, never reaches llama.cpp's assert
    assert stub.Predict(pb.PredictOptions(Prompt="still works", Tokens=8)).tokens == 8


def test_expert_offload_option_loads_and_matches(mtp_backend, p50):
    """`n_cpu_moe:N` (what the selector emits for experts-in-RAM picks) keeps those experts in a CPU buffer."""
    assert expert_pattern(2, 40) == r"^blk\.(0|1)\.ffn_(up|down|gate|gate_up)_exps\.weight$"
    stub = mtp_backend.stub
    req = dict(Prompt="experts in RAM", Tokens=32)
    assert stub.LoadModel(synth_options(p50, ["spec_type:none"])).success
    plain = stub.Predict(pb.PredictOptions(**req)).message
    for opt in ("n_cpu_moe:2", "cpu_moe"):
        res = stub.LoadModel(synth_options(p50, ["spec_n_max:3", opt]))
        assert res.success, res.message
        assert stub.Predict(pb.PredictOptions(**req)).message == plain
