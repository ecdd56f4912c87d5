"""N-gram drafting (llama.cpp's ngram-simple and ngram-mod): the index, and exact speculation with it.

The index tests need no model. Exactness: greedy and seeded output with n-gram drafts (alone, or before MTP) is
the plain output, on SmolLM2 and on clear-margin synthetic models, in one slot and four; prompts repeat text so
drafts are accepted. A recurrent model without an MTP head rolls n-gram drafts back through n_rs_seq alone.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import llama_cpp.llama_cpp as L
import numpy as np
import pytest
from conftest import smollm2_options, synth_options

from backend.api.openai_api import timings
from backend.core.errors import InvalidOptionError, InvalidRequestError
from backend.core.gguf_file import read_gguf
from backend.engine.generation import GenerationRequest, Result
from backend.engine.llama import Engine, EngineConfig
from backend.engine.ngram import NgramDrafting, NgramMod, NgramSimple, NgramTable, window_hashes
from backend.engine.sampling import SamplingParams
from backend.engine.scheduler import Scheduler, Stream, collect
from backend.engine.speculative import SpecConfig
from backend.proto import backend_pb2 as pb
from backend.service.options import parse_options, plan_load
from backend.synth.qwen35moe import read_synth_info

SEEDED = SamplingParams(temperature=0.9, top_k=40, top_p=0.95, seed=1234)
# Short n-grams and drafts, so the short texts of tests match (llama.cpp's defaults want 12- and 24-token n-grams).
SIMPLE = dict(ngram="ngram-simple", ngram_size_n=3, ngram_size_m=16)
MOD = dict(ngram="ngram-mod", ngram_mod_n_match=4, ngram_mod_n_min=2, ngram_mod_n_max=16)
PARAGRAPH = ("The lighthouse keeper climbed the spiral stairs every evening at dusk, carrying a lantern, a notebook "
             "and a thermos of tea. He wrote down the colour of the sea, the direction of the wind and the names of "
             "the ships that passed, and when the fog rolled in he rang the great bell until morning.")


# ------------------------------------------------------------------------------------------ the index


def test_window_hashes_roll_like_the_scalar_hash():
    tokens = [5, 3, 9, 1, 2, 7, 4, 4, 4, 3, 9]
    d = NgramSimple(tokens[:4], 3, 8)
    d.sync(tokens[4:])  # rolled one token at a time
    assert d.hash == int(window_hashes(tokens, 3)[-1])
    assert len(window_hashes(tokens[:2], 3)) == 0


def test_simple_drafts_what_followed_the_most_recent_occurrence():
    d = NgramSimple([1, 2, 3, 10, 11, 12, 13, 1, 2, 3, 20, 21, 22, 23, 9, 1, 2], 3, 4)
    assert d.draft(16) == []  # [9, 1, 2] never occurred before
    d.sync([3])  # the history now ends with [1, 2, 3]: seen twice, the later one is followed by 20..23
    assert d.draft(16) == [20, 21, 22, 23]
    assert d.draft(2) == [20, 21]  # the request's cap
    assert d.draft(0) == []


def test_simple_updates_incrementally_and_drops_short_drafts():
    d = NgramSimple([7, 8, 9], 2, 5)
    d.sync([1, 2, 3, 4, 5, 6, 7, 8])  # generated text: [7, 8] recurs, followed by what was generated after it
    assert d.draft(16) == [9, 1, 2, 3, 4]
    d.sync([1, 2, 3, 4, 5, 6, 7, 8, 9, 1, 2, 3, 4, 5, 6, 1])  # [6, 1]: never seen before
    assert d.draft(16) == []
    # [5, 5, 5] occurred one token earlier, followed only by [5]: shorter than the n-gram, as llama.cpp drops it.
    assert NgramSimple([5, 5, 5, 5], 3, 8).draft(16) == []


def test_drafts_stop_at_an_image():
    d = NgramSimple([1, 2, 3, -5, -5, 4, 1, 2], 2, 8)
    assert d.draft(16) == [3]


def test_mod_chains_lookups_and_shares_its_table():
    table = NgramTable(2, size=4096)
    a = NgramMod(table, [1, 2, 3, 4, 5, 6], n_min=1, n_max=8)
    b = NgramMod(table, [9, 9, 3, 4], n_min=1, n_max=8)  # another request: drafts from the first one's text
    assert b.draft(16) == [5, 6]
    a.sync([1, 2])
    assert a.draft(16) == [3, 4, 5, 6, 1, 2, 3, 4]  # a loop keeps drafting to n_max
    fresh = NgramTable(2, size=4096)
    NgramMod(fresh, [1, 2, 3], n_min=2, n_max=8)
    assert NgramMod(fresh, [9, 1, 2], n_min=2, n_max=8).draft(16) == []  # [3], then nothing: shorter than n_min


def test_mod_resets_a_full_table_and_after_a_streak_of_misses():
    table = NgramTable(2, size=16)
    NgramMod(table, list(range(20, 30)), n_min=1, n_max=4)
    assert table.occupancy > 0.25
    d = NgramMod(table, [1, 2, 3, 1, 2], n_min=1, n_max=4)  # the full table is reset first
    assert table.used <= 4 and d.draft(4)[:1] == [3]
    for _ in range(4):
        d.observe(4, 0)
    table.add(12345, 7)
    d.observe(4, 0)  # the fifth miss in a row: start over from this request's own text
    assert table.get(12345) == NgramTable.EMPTY and d.draft(4)[:1] == [3]


def test_spec_settings_are_checked_and_size_the_engine():
    spec = SpecConfig(n_max=4, **MOD)
    assert spec.ngram_max == 16 and spec.n_draft_max(True) == 16 and SpecConfig(n_max=4).n_draft_max(True) == 4
    assert SpecConfig(n_max=4).n_draft_max(False) == 0
    with pytest.raises(InvalidRequestError, match="ngram_size_n"):
        SpecConfig(ngram="ngram-simple", ngram_size_n=0)
    with pytest.raises(ValueError):
        NgramDrafting(SpecConfig(ngram="ngram-cache"))


def test_spec_type_lists_and_ngram_options():
    opts = parse_options(["spec_type:ngram_mod,draft-mtp", "spec_ngram_size_n:5", "spec_ngram_mod_n_max:32"])
    assert opts == {"spec_type": ("ngram-mod", "draft-mtp"), "ngram_size_n": 5, "ngram_mod_n_max": 32}
    for unsupported in ("draft-eagle3,ngram-simple", "ngram-cache"):  # refused by name, never silently skipped
        with pytest.raises(InvalidOptionError, match=unsupported.split(",")[0]):
            parse_options([f"spec_type:{unsupported}"])


def test_plan_load_chains_ngram_before_mtp(p70, tiny_nomtp_gguf):
    def plan(path, *options):
        req = pb.ModelOptions(ModelFile=str(path), ContextSize=512, Options=list(options))
        return plan_load(req, read_gguf(path), path)

    p = plan(p70, "spec_type:ngram-mod,draft-mtp", "spec_n_max:4")
    assert (p.spec.ngram, p.spec.n_max, p.engine.mtp, p.engine.n_draft_max) == ("ngram-mod", 4, True, 64)
    assert p.mtp_reason.startswith("ngram-mod drafting on (up to 64 tokens), then MTP")
    p = plan(tiny_nomtp_gguf, "spec_type:ngram-simple,draft-mtp", "spec_ngram_size_m:20")
    assert (p.spec.ngram, p.spec.n_max, p.engine.mtp, p.engine.n_draft_max) == ("ngram-simple", 0, False, 20)
    assert "then MTP requested but the GGUF has no MTP head" in p.mtp_reason
    p = plan(p70, "spec_type:ngram-simple")  # n-gram only: the head stays unloaded
    assert (p.engine.mtp, p.spec.n_max, p.engine.n_draft_max) == (False, 0, 48)


def test_http_timings_carry_the_ngram_share_only_when_there_is_one():
    assert "draft_ngram_n" not in timings(pb.Reply(draft_n=5, draft_n_accepted=3))
    t = timings(pb.Reply(draft_n=5, draft_n_accepted=3, draft_ngram_n=0, draft_ngram_n_accepted=0))
    assert (t["draft_ngram_n"], t["draft_ngram_n_accepted"]) == (0, 0)


# ------------------------------------------------------------------------------------------ exactness


def load(path, spec: SpecConfig, *, n_seq: int = 1, mtp: bool = False) -> Scheduler:
    cfg = EngineConfig(n_ctx=512, n_seq=n_seq, n_batch=128, n_threads=2, mtp=mtp, n_draft_max=spec.n_draft_max(mtp),
                       n_rs_seq=spec.n_rs_seq(mtp))
    return Scheduler(Engine(path, cfg), spec)


@pytest.fixture(scope="module")
def p70(synth_model):
    return synth_model("predictable", acceptance=0.7)


def _cycle_prompt(path, start: str = "Hello") -> list[int]:
    """A stretch of the model's own cycle, then tokens that lead into it: the output walks into text the prompt
    holds (n-gram drafts) after stretches it does not (MTP drafts)."""
    c = read_synth_info(path).continuation(_tokens(path, start)[-1], 200)
    return c[60:120] + c[0:5]


@contextmanager
def _vocab(path) -> Iterator[Engine]:
    """A small engine for the model's vocabulary."""
    engine = Engine(path, EngineConfig(n_ctx=64, n_threads=1))
    try:
        yield engine
    finally:
        engine.close()


def _tokens(path, text: str) -> list[int]:
    with _vocab(path) as engine:
        return engine.tokenize(text)


def run(s: Scheduler, prompt: list[int], sampling: SamplingParams = SamplingParams(), n: int = 120) -> Result:
    return collect(s, GenerationRequest(prompt=prompt, max_tokens=n, sampling=sampling))


CONFIGS = {"ngram-simple": (SpecConfig(**SIMPLE), False), "ngram-mod": (SpecConfig(**MOD), False),
           "ngram-mod,draft-mtp": (SpecConfig(n_max=4, adaptive=False, **MOD), True)}


@pytest.mark.parametrize("sampling", [SamplingParams(), SEEDED], ids=["greedy", "seeded"])
@pytest.mark.parametrize("config", list(CONFIGS))
def test_synthetic_equals_plain_with_accepted_ngram_drafts(p70, config, sampling):
    spec, mtp = CONFIGS[config]
    plain, spec_s = load(p70, SpecConfig()), load(p70, spec, mtp=mtp)
    try:
        prompt = _cycle_prompt(p70)
        want, got = run(plain, prompt, sampling), run(spec_s, prompt, sampling)
        assert got.token_ids == want.token_ids
        ngram_drafted, ngram_accepted = got.stats.by_origin["ngram"]
        assert 0 < ngram_accepted < ngram_drafted  # matches kept, and a stale one rolled back
        if mtp:
            assert got.stats.by_origin["mtp"][1] > 0  # MTP drafted where the n-gram found nothing
            assert got.stats.drafted == ngram_drafted + got.stats.by_origin["mtp"][0]
    finally:
        plain.close()
        spec_s.close()


def test_mtp_context_mirrors_the_tokens_ngram_drafts_accepted(p70):
    """After each step, n-gram steps with rejected drafts among them, the MTP context holds every kept position and
    the head drafts from the target's hidden row of the last kept token (what a fresh prefill of them gives)."""
    spec, _ = CONFIGS["ngram-mod,draft-mtp"]
    s, fresh = load(p70, spec, mtp=True), load(p70, SpecConfig(n_max=4), mtp=True)
    try:
        stream = Stream().attach(s, GenerationRequest(prompt=_cycle_prompt(p70), max_tokens=120))
        e, rejected = s.engine, 0
        while s.step() and s.slots[0].ticket is not None:
            drafted, accepted = stream.ticket.result.stats.by_origin["ngram"]
            rejected, missed = drafted - accepted, drafted - accepted > rejected
            if not missed:
                continue
            e.flush_mirror([0])
            assert L.llama_memory_seq_pos_max(L.llama_get_memory(e._dctx), 0) == e.n_past(0) - 1
            fresh.engine.reset()
            fresh.engine.prefill(e.seqs[0].tokens)
            assert np.allclose(fresh.engine.seqs[0].pending_h, e.seqs[0].pending_h, atol=1e-4)
        assert rejected > 0
    finally:
        s.close()
        fresh.close()


@pytest.mark.parametrize("config", list(CONFIGS))
def test_synthetic_four_slots_equal_each_alone(p70, config):
    """Rows of n-gram, MTP and no drafts side by side (padded to one length on this recurrent model)."""
    spec, mtp = CONFIGS[config]
    plain, spec_s = load(p70, SpecConfig()), load(p70, spec, n_seq=4, mtp=mtp)
    try:
        prompts = [_cycle_prompt(p70, w) for w in ("Hello", "World", "Again", "Other")]
        reqs = [GenerationRequest(prompt=p if i != 3 else p[-5:], max_tokens=80 + 7 * i, ignore_eos=True,
                                  sampling=SEEDED if i % 2 else SamplingParams()) for i, p in enumerate(prompts)]
        want = [collect(plain, r) for r in reqs]
        streams = [Stream().attach(spec_s, r) for r in reqs]
        spec_s.run_until_idle()
        for st in streams:
            list(st.chunks())
        got = [st.result for st in streams]
        assert [r.token_ids for r in got] == [r.token_ids for r in want]
        assert all(r.stats.by_origin["ngram"][1] > 0 for r in got[:3])  # request 3's prompt holds nothing ahead
    finally:
        plain.close()
        spec_s.close()


@pytest.mark.parametrize("config", ["ngram-simple", "ngram-mod"])
def test_smollm2_repeating_a_paragraph_equals_plain(smollm2_path, config):
    spec = SpecConfig(**(SIMPLE if config == "ngram-simple" else MOD))
    plain, spec_s = load(smollm2_path, SpecConfig()), load(smollm2_path, spec)
    try:
        prompt = plain.engine.tokenize(f"Here is a paragraph:\n\n{PARAGRAPH}\n\nRewrite it with one change: the "
                                       "keeper drinks coffee instead of tea.\n\nThe lighthouse keeper")
        for sampling, copied in ((SamplingParams(), 30), (SEEDED, 1)):  # sampled at 0.9, it copies less
            want, got = run(plain, prompt, sampling, 48), run(spec_s, prompt, sampling, 48)
            assert got.token_ids == want.token_ids
            assert got.stats.by_origin["ngram"][1] >= copied, got.stats.as_dict()  # drafted, not decoded one by one
    finally:
        plain.close()
        spec_s.close()


def test_recurrent_model_without_a_head_rolls_back_from_a_snapshot(synth_model):
    """No in-place recurrent rollback (n_rs_seq 0: its snapshots would cost every decode): a rejected n-gram
    draft goes back to the state from before its row and the kept tokens are decoded again, still exact."""
    path = synth_model("predictable", mtp=False)
    plain, spec_s = load(path, SpecConfig()), load(path, SpecConfig(**SIMPLE))
    try:
        assert spec_s.engine.recurrent and not spec_s.engine.mtp_enabled and spec_s.engine.n_rs_seq == 0
        prompt = _cycle_prompt(path)
        want, got = run(plain, prompt), run(spec_s, prompt)
        assert got.token_ids == want.token_ids
        assert 0 < got.stats.accepted < got.stats.drafted
    finally:
        plain.close()
        spec_s.close()


# ------------------------------------------------------------------------------------------ over gRPC


def _text(path, tokens: list[int]) -> str:
    with _vocab(path) as engine:
        return engine.detokenize(tokens).decode("utf-8", "replace")


def test_grpc_ngram_mod_then_mtp_is_exact_and_counted(backend, p70):
    stub = backend.stub
    req = dict(Prompt=_text(p70, _cycle_prompt(p70)), Tokens=96, Temperature=0.0)
    assert stub.LoadModel(synth_options(p70, ["spec_type:none"])).success
    plain = stub.Predict(pb.PredictOptions(**req))
    assert not plain.HasField("draft_ngram_n")
    res = stub.LoadModel(synth_options(p70, ["spec_type:ngram-mod,draft-mtp", "spec_n_max:4", "spec_adaptive:false",
                                     "spec_ngram_mod_n_match:4", "spec_ngram_mod_n_min:2", "spec_ngram_mod_n_max:16"]))
    assert res.success and "ngram-mod drafting on (up to 16 tokens), then MTP" in res.message, res.message
    assert stub.Status(pb.HealthMessage()).memory.breakdown["ngram_table"] == 16 * 2**20  # llama.cpp's 4M entries
    r = stub.Predict(pb.PredictOptions(**req))
    assert r.message == plain.message
    assert r.HasField("draft_ngram_n") and 0 < r.draft_ngram_n_accepted <= r.draft_ngram_n < r.draft_n
    streamed = list(stub.PredictStream(pb.PredictOptions(**req)))
    assert b"".join(x.message for x in streamed) == plain.message
    assert streamed[-1].draft_ngram_n > 0


def test_grpc_ngram_simple_on_a_headless_recurrent_model(backend, tiny_nomtp_gguf):
    stub = backend.stub
    res = stub.LoadModel(synth_options(tiny_nomtp_gguf, ["spec_type:ngram-simple", "spec_ngram_size_n:2",
                                                 "spec_ngram_size_m:8"]))
    assert res.success and "ngram-simple drafting on (up to 8 tokens)" in res.message, res.message
    bd = stub.Status(pb.HealthMessage()).memory.breakdown
    assert "mtp_kv" not in bd
    # No in-place rollback snapshots (each would cost every decode): a rejected draft rolls back from a snapshot.
    assert bd.get("mtp_rollback_snapshots", 0) == 0 and bd["recurrent_state"] > 0
    r = stub.Predict(pb.PredictOptions(Prompt="a b c a b c a b c a b c", Tokens=48, Temperature=0.0, IgnoreEOS=True))
    assert r.tokens == 48 and r.HasField("draft_ngram_n") and r.draft_ngram_n == r.draft_n


def test_smollm2_over_grpc_with_llama_cpp_option_names(backend, smollm2_path):
    stub = backend.stub
    prompt = f"{PARAGRAPH}\n\nThe same paragraph again:\n\n"
    assert stub.LoadModel(smollm2_options(smollm2_path, Options=["spec_type:none"])).success
    plain = stub.Predict(pb.PredictOptions(Prompt=prompt, Tokens=48, Temperature=0.0))
    res = stub.LoadModel(smollm2_options(smollm2_path, Options=["spec_type:ngram-simple", "ngram_size_n:3",
                                                                 "ngram_size_m:12"]))
    assert res.success, res.message
    r = stub.Predict(pb.PredictOptions(Prompt=prompt, Tokens=48, Temperature=0.0))
    assert r.message == plain.message and r.draft_ngram_n_accepted > 0
    assert timings(r)["draft_ngram_n"] == r.draft_ngram_n
