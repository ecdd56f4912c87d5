"""Prompt reuse: recurrent-state checkpoints, the RAM prompt cache and the disk prompt cache.

A hybrid model (the synthetic qwen35moe: Gated-DeltaNet layers beside attention, plus the MTP head) cannot cut its
recurrent state back, so without checkpoints any divergence from what a slot holds re-prefills the whole prompt.
Every test here checks two things: that the prompt was NOT prefilled again (`n_cached`, the cache source), and
that the greedy answer equals the one a fresh engine gives after a cold prefill (the restore is exact).
"""

from __future__ import annotations

import os
import random
import threading
from pathlib import Path

import grpc
import numpy as np
import pytest
import yaml
from conftest import BackendProcess, wait_until

from backend.core.gguf_file import read_gguf
from backend.engine import prompt_cache
from backend.engine.generation import GenerationRequest, Result
from backend.engine.llama import Engine, EngineConfig
from backend.engine.prompt_cache import (
    CacheConfig,
    CacheFileError,
    Checkpoint,
    DiskCache,
    RamCache,
    SavedState,
    checkpoint_positions,
    common_prefix,
    decode,
    encode,
    model_identity,
    thin,
)
from backend.engine.sampling import SamplingParams
from backend.engine.scheduler import Scheduler, Stream, collect
from backend.engine.speculative import SpecConfig
from backend.proto import backend_pb2 as pb
from backend.service.options import plan_load

N_CTX = 1024


def scheduler(path: Path, *, n_max: int = 0, n_seq: int = 1, **cache) -> Scheduler:
    cfg = EngineConfig(n_ctx=N_CTX, n_seq=n_seq, n_batch=64, n_ubatch=64, n_threads=2, mtp=n_max > 0,
                       n_draft_max=n_max)
    return Scheduler(Engine(path, cfg), SpecConfig(n_max=n_max, adaptive=False),
                     cache=CacheConfig(**{"min_step": 64, **cache}))


def run(s: Scheduler, prompt: list[int], n: int = 24) -> Result:
    return collect(s, GenerationRequest(prompt=list(prompt), max_tokens=n, ignore_eos=True))


def cold(path: Path, prompt: list[int], *, n_max: int = 0, n: int = 24) -> list[int]:
    """The greedy answer of a fresh engine that prefills the whole prompt."""
    s = scheduler(path, n_max=n_max, ram_mib=0, n_checkpoints=0)
    try:
        return run(s, prompt, n).token_ids
    finally:
        s.close()


def tokens(n: int, seed: int, vocab: int = 500) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(1, vocab) for _ in range(n)]


@pytest.fixture(scope="module")
def hybrid(synth_model):
    """Clear margins, an MTP head that is right half of the time (drafts are accepted and rejected)."""
    return synth_model("predictable", acceptance=0.5)


# ------------------------------------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("n_max", [0, 4], ids=["plain", "mtp"])
def test_checkpoints_resume_a_rewritten_tail_and_the_same_prompt(hybrid, n_max):
    s = scheduler(hybrid, n_max=n_max, ram_mib=0)
    try:
        prompt = tokens(600, 1)
        first = run(s, prompt)
        positions = [c.n_tokens for c in s.engine.seqs[0].checkpoints]
        assert positions == [64, 128, 192, 256, 320, 384, 448, 512, 576, 596]  # every min_step, and the end - 4
        again = run(s, prompt)
        assert (again.n_cached, again.cache_source) == (600, "checkpoint")  # the prompt's end, with its logits
        assert again.token_ids == first.token_ids
        rewritten = prompt[:540] + tokens(60, 2)
        got = run(s, rewritten)
        assert (got.n_cached, got.cache_source) == (512, "checkpoint")  # the newest checkpoint before position 540
        assert got.token_ids == cold(hybrid, rewritten, n_max=n_max)
        if n_max:
            assert got.stats.drafted > 0 and 0 < got.stats.accepted < got.stats.drafted
    finally:
        s.close()


def test_without_checkpoints_a_divergence_reprefills(hybrid):
    s = scheduler(hybrid, ram_mib=0, n_checkpoints=0)
    try:
        prompt = tokens(300, 3)
        run(s, prompt)
        assert s.engine.seqs[0].checkpoints == []
        got = run(s, prompt[:250] + tokens(50, 4))
        assert got.n_cached == 0 and got.cache_source == ""
    finally:
        s.close()


def test_checkpoint_positions():
    prompt = [1] * 10 + [9] + [1] * 39 + [9] + [1] * 39 + [9] + [1] * 30  # turn markers (9) at 10, 50 and 90
    assert checkpoint_positions(prompt, frozenset({9}), 32) == [32, 50, 64, 90, 96, 117]
    assert checkpoint_positions(prompt, frozenset(), 0) == [117]


def test_a_thinking_chat_prefills_only_its_new_tokens(hybrid):
    """Qwen3.5-style: each turn's history keeps the answer without its reasoning, so the prompt diverges from the
    slot right after the assistant's turn marker; the checkpoint before that marker resumes it."""
    s = scheduler(hybrid, n_max=4, ram_mib=0, min_step=256)
    try:
        (im_start,) = s.engine.turn_markers
        system, history = [im_start] + tokens(300, 20), []
        for turn in range(4):
            user = [im_start] + tokens(30, 30 + turn)
            prompt = system + [t for u, a in history for t in u + a] + user + [im_start] + tokens(5, 99)
            got = run(s, prompt)
            if turn:
                new = len(user) + len(history[-1][1]) + 6 + 1  # this turn's user message, the last answer, the opener
                assert got.cache_source == "checkpoint" and got.n_prompt - got.n_cached <= new, got.n_cached
                assert got.token_ids == cold(hybrid, prompt, n_max=4)
            history.append((user, [im_start] + got.token_ids[12:]))  # the first 12 tokens stand for the reasoning
    finally:
        s.close()


def test_checkpoint_limit_keeps_them_spread():
    ckpts = [Checkpoint(n, b"x") for n in (10, 20, 30, 40, 50, 100, 400)]
    kept = [c.n_tokens for c in thin(ckpts, 4)]
    assert len(kept) == 4 and kept[-1] == 400 and kept[0] == 10
    assert [c.n_tokens for c in thin(ckpts, 0)] == []
    assert [c.n_tokens for c in thin(ckpts, 10)] == [10, 20, 30, 40, 50, 100, 400]


def test_checkpoints_per_slot_are_bounded(hybrid):
    s = scheduler(hybrid, ram_mib=0, n_checkpoints=3)
    try:
        run(s, tokens(700, 5))
        ckpts = s.engine.seqs[0].checkpoints
        assert len(ckpts) == 3 and ckpts[-1].n_tokens == 696
        end = s.engine.seqs[0].end
        assert end is not None and end.n_tokens == 700 and end.logits is not None
        assert s.engine.checkpoint_bytes == sum(c.nbytes for c in ckpts) + end.nbytes > end.nbytes
    finally:
        s.close()


def test_a_dense_model_needs_no_checkpoints(smollm2_path):
    s = scheduler(smollm2_path, ram_mib=0)
    try:
        prompt = s.engine.tokenize("The quick brown fox jumps over the lazy dog. " * 12)
        run(s, prompt, 8)
        assert not s.engine.recurrent and s.engine.seqs[0].checkpoints == []
        got = run(s, prompt[:-20] + s.engine.tokenize(" A different ending.", add_special=False), 8)
        assert got.cache_source == "slot" and got.n_cached == len(prompt) - 20  # attention KV truncates anywhere
    finally:
        s.close()


@pytest.mark.parametrize("model", ["smollm2", "hybrid-mtp"])
def test_the_same_prompt_again_samples_the_logits_its_prefill_computed(model, hybrid, smollm2_path):
    """A repeated prompt (a regenerated answer, an agent's retry, a stream after a non-stream call) is not decoded
    again: its first token comes from the logits row its prefill computed, so greedy and seeded answers and their
    logprobs repeat exactly. (Decoding its last token again, alone, rounds differently from the prefill's batch and
    can flip a near-tie on a real model.)"""
    s = scheduler(smollm2_path if model == "smollm2" else hybrid, n_max=4 if model == "hybrid-mtp" else 0, ram_mib=0)
    try:
        prompt = s.engine.tokenize("<|im_start|>user\nName three rivers of Europe.<|im_end|>\n<|im_start|>assistant\n") \
            if model == "smollm2" else tokens(300, 11)

        def answer(sampling: SamplingParams) -> tuple[Result, list[dict]]:
            stream = Stream().attach(s, GenerationRequest(prompt=list(prompt), sampling=sampling, max_tokens=12,
                                                          ignore_eos=True, logprobs=2))
            s.run_until_idle()
            chunks = list(stream.chunks(timeout=60))
            assert stream.result is not None
            return stream.result, [lp for c in chunks for lp in c.logprobs]

        for sampling in (SamplingParams(), SamplingParams(temperature=0.9, seed=7)):
            (first, lp1), (again, lp2) = answer(sampling), answer(sampling)
            assert again.n_cached == len(prompt) and again.token_ids == first.token_ids
            assert lp2 == lp1  # bit for bit: the same rows
    finally:
        s.close()


@pytest.mark.parametrize("n_max", [0, 4], ids=["plain", "mtp"])
def test_a_next_turn_resumes_at_the_previous_prompts_end(hybrid, n_max):
    """The answer went beyond the rollback window; the next turn extends the prompt (the answer re-rendered
    differently): it resumes from the state kept at the prompt's end, not from a checkpoint before it."""
    s = scheduler(hybrid, n_max=n_max, ram_mib=0)
    try:
        prompt = tokens(300, 31)
        run(s, prompt, 24)
        longer = prompt + tokens(30, 32)
        got = run(s, longer)
        assert (got.n_cached, got.cache_source) == (len(prompt), "checkpoint")
        assert got.token_ids == cold(hybrid, longer, n_max=n_max)
    finally:
        s.close()


def test_an_idle_slot_mirrors_its_prompt_tail_before_the_next_turn(hybrid):
    """A request that never drafted after its prompt leaves the prompt's last partial chunk of MTP mirror entries
    queued; the serving loop decodes them while it is idle, so the next turn's prefill does not pay for them, and
    the next turn's answer is still the cold one."""
    s = scheduler(hybrid, n_max=4, ram_mib=0)
    thread = threading.Thread(target=s.run, daemon=True)
    thread.start()
    try:
        prompt = tokens(600, 21)
        run(s, prompt, 1)  # one token: the head never drafts, the tail of the prompt stays queued
        wait_until(lambda: not s.engine.seqs[0].mirror, 30, message="the idle slot kept its mirror queue")
        longer = prompt + tokens(40, 22)
        got = run(s, longer)
        assert got.n_cached >= len(prompt) - 4 and got.token_ids == cold(hybrid, longer, n_max=4)
    finally:
        s.close()
        thread.join(30)


# ------------------------------------------------------------------------------------------- RAM cache


@pytest.mark.parametrize("n_max", [0, 4], ids=["plain", "mtp"])
def test_a_conversation_returns_to_its_slot_from_the_ram_cache(hybrid, n_max):
    s = scheduler(hybrid, n_max=n_max)
    try:
        a, b = tokens(400, 6), tokens(400, 7)
        first = run(s, a)
        run(s, b)  # takes the only slot: a's state goes to the RAM cache
        assert len(s.ram.entries) >= 1
        turn2 = a + first.token_ids[:-1] + tokens(30, 8)  # a's next turn, with its answer in the history
        got = run(s, turn2)
        assert got.cache_source == "ram" and got.n_cached == len(a) + len(first.token_ids) - 1
        assert got.token_ids == cold(hybrid, turn2, n_max=n_max)
        assert s.metrics.cache_hits["ram"] == 1
    finally:
        s.close()


def test_smollm2_restores_from_ram_exactly(smollm2_path):
    """A real model: the restored KV is a byte copy, so the answer equals a cold prefill's token for token."""
    s = scheduler(smollm2_path)
    try:
        a = s.engine.tokenize("<|im_start|>user\nWrite a short poem about the sea and its colours, the waves, the "
                              "light at dawn and at dusk, the boats and the birds above them.<|im_end|>\n")
        b = s.engine.tokenize("<|im_start|>user\nList three prime numbers and explain why.<|im_end|>\n")
        first = run(s, a, 16)
        run(s, b, 8)
        again = a + first.token_ids[:-1] + s.engine.tokenize("\n<|im_start|>user\nAnd a second one?",
                                                              add_special=False)
        got = run(s, again, 16)
        assert got.cache_source == "ram" and got.n_cached == len(a) + len(first.token_ids) - 1
        assert got.token_ids == cold(smollm2_path, again, n=16)
    finally:
        s.close()


def test_eight_conversations_on_four_slots_prefill_only_new_tokens(hybrid):
    s = scheduler(hybrid, n_seq=4)
    try:
        convs = [tokens(200, 100 + i) for i in range(8)]
        for turn in range(2):
            streams = []
            for i, c in enumerate(convs):
                streams.append((i, Stream().attach(s, GenerationRequest(prompt=list(c), max_tokens=8,
                                                                          ignore_eos=True))))
            s.run_until_idle()
            for i, st in streams:
                list(st.chunks())
                r = st.result
                if turn:
                    # Only the new tokens (and the few before the last checkpoint) are prefilled.
                    assert r.n_prompt - r.n_cached <= 20 + 4, (i, r.n_cached, r.cache_source)
                convs[i] = convs[i] + r.token_ids[:-1] + tokens(20, 1000 * turn + i)
        assert s.metrics.cache_misses == 8  # the first turn of each conversation only
    finally:
        s.close()


def test_ram_cache_evicts_least_recently_used():
    def state(toks, size):
        return SavedState(tokens=tuple(toks), target=b"t" * size)

    cache = RamCache(limit=1000)
    a, b, c = state([1, 2, 3], 400), state([4, 5, 6], 400), state([7, 8, 9], 400)
    assert cache.add(a) and cache.add(b)
    cache.touch(a)  # a used after b
    assert cache.add(c)
    assert [e.tokens for e in cache.entries] == [a.tokens, c.tokens] and cache.evictions == 1
    assert not cache.add(state([1], 2000))  # larger than the whole cache: refused, nothing evicted
    assert cache.best([7, 8, 10])[1] == 2
    longer = state([1, 2, 3, 4], 100)
    cache.add(longer)  # extends a: a goes
    assert a.tokens not in [e.tokens for e in cache.entries]


def test_ram_cache_gives_way_under_memory_pressure():
    free = [10_000]
    cache = RamCache(limit=None, keep_free=5_000, available=lambda: free[0])
    a = SavedState(tokens=(1,), target=b"t" * 3_000)
    assert cache.add(a)
    free[0] = 7_000  # something else took memory: the next state would leave too little
    b = SavedState(tokens=(2,), target=b"t" * 3_000)
    assert not cache.add(b) and cache.entries == [] and cache.evictions == 1  # a was evicted first, b still too big
    free[0] = 20_000
    assert cache.add(b)


def test_small_cache_ram_bounds_the_cache(hybrid):
    s = scheduler(hybrid, ram_mib=1)
    try:
        for seed in range(4):
            run(s, tokens(400, 200 + seed), 4)
        assert s.ram.nbytes <= 1 << 20 and s.ram.entries
    finally:
        s.close()


def test_cache_off_and_option_names(smollm2_path):
    info = read_gguf(smollm2_path)
    req = pb.ModelOptions(Options=["ctx_checkpoints:8", "checkpoint_min_step:128", "cache_ram:0",
                                   "cache_idle_slots:false", "slot_prompt_similarity:0.5",
                                   "prompt_cache_dir:/tmp/apexmtp-pc"])
    plan = plan_load(req, info, smollm2_path)
    assert plan.cache == CacheConfig(n_checkpoints=8, min_step=128, ram_mib=0, idle_slots=False, similarity=0.5,
                                     disk_dir="/tmp/apexmtp-pc")
    assert plan_load(pb.ModelOptions(Options=["n_ctx_checkpoints:2"]), info, smollm2_path).cache.n_checkpoints == 2
    assert plan_load(pb.ModelOptions(), info, smollm2_path).cache == CacheConfig()


# ------------------------------------------------------------------------------------------- disk cache


def test_disk_cache_survives_a_restart_and_refuses_corrupt_files(hybrid, tmp_path):
    prompt = tokens(500, 9)
    s = scheduler(hybrid, n_max=4, disk_dir=str(tmp_path), disk_min_tokens=100)
    first = run(s, prompt)
    s.close()  # waits for the writes
    files = list(tmp_path.glob("*.apc"))
    assert len(files) == 1 and not list(tmp_path.glob(".tmp-*"))

    s = scheduler(hybrid, n_max=4, disk_dir=str(tmp_path), disk_min_tokens=100)
    try:
        got = run(s, prompt)
        # The state saved at close holds the answer too, and the prompt's end: nothing is prefilled again.
        assert got.cache_source == "disk" and got.n_cached == len(prompt)
        assert got.token_ids == first.token_ids
    finally:
        s.close()

    for f in tmp_path.glob("*.apc"):  # flip one payload byte of every file
        data = bytearray(f.read_bytes())
        data[-100] ^= 0xFF
        f.write_bytes(bytes(data))
    s = scheduler(hybrid, n_max=4, disk_dir=str(tmp_path), disk_min_tokens=100)
    try:
        got = run(s, prompt)
        assert got.cache_source == "" and got.n_cached == 0 and got.token_ids == first.token_ids
        assert s.disk.refused >= 1
    finally:
        s.close()


def test_disk_cache_ignores_another_models_files(hybrid, synth_model, tmp_path):
    prompt = tokens(300, 10)
    s = scheduler(hybrid, disk_dir=str(tmp_path), disk_min_tokens=100)
    run(s, prompt)
    s.close()
    other = synth_model("predictable", acceptance=0.9)
    s = scheduler(other, disk_dir=str(tmp_path), disk_min_tokens=100)
    try:
        got = run(s, prompt)
        assert got.cache_source == "" and got.n_cached == 0  # keyed by the model file's identity
    finally:
        s.close()
    # A file of the other model renamed to look like ours is refused by its header, not restored.
    ours = DiskCache(tmp_path, "b" * 32, 1 << 30)
    foreign = next(tmp_path.glob("*.apc"))
    os.replace(foreign, tmp_path / f"{'b' * 16}-{'0' * 32}.apc")
    assert ours.index() == {} and ours.refused == 1


def test_another_format_versions_files_are_left_alone(smollm2_path, tmp_path, monkeypatch):
    """Two apexmtp versions sharing a --prompt-cache directory: each sees only its own format's files, and
    neither removes the other's (the format version is part of the identity that names them)."""
    ours_id = model_identity(smollm2_path, {"type_k": "f16"})
    monkeypatch.setattr(prompt_cache, "_VERSION", prompt_cache._VERSION + 1)
    theirs_id = model_identity(smollm2_path, {"type_k": "f16"})
    assert theirs_id != ours_id
    theirs = DiskCache(tmp_path, theirs_id, 1 << 30)
    theirs.store(SavedState(tokens=(1, 2, 3), target=b"T" * 64)).result()
    theirs.close()
    monkeypatch.undo()
    ours = DiskCache(tmp_path, ours_id, 1 << 30)
    assert ours.index() == {} and ours.refused == 0
    assert len(list(tmp_path.glob("*.apc"))) == 1
    ours.close()


def test_truncated_file_and_format_checks():
    mirror = ((2, 1, np.full(4, 0.5, np.float32), None), (-7, 2, np.full(4, 2.0, np.float32), np.arange(4)))
    state = SavedState(tokens=(1, 2, 3), target=b"T" * 64, mtp=b"M" * 8, h=np.ones(4, np.float32),
                       checkpoints=(Checkpoint(2, b"C" * 16, np.zeros(4, np.float32)),), mirror=mirror)
    data = encode(state, "id")
    back = decode(data, "id")
    assert back.tokens == state.tokens and back.target == state.target and back.mtp == state.mtp
    assert back.checkpoints[0].n_tokens == 2 and np.array_equal(back.h, state.h)
    assert [(t, p, h.tolist(), None if x is None else x.tolist()) for t, p, h, x in back.mirror] == [
        (2, 1, [0.5] * 4, None), (-7, 2, [2.0] * 4, [0, 1, 2, 3])]
    for bad, why in ((data[:-1], "truncated"), (b"garbage" + data, "magic"), (data.replace(b'"id"', b'"xx"'),
                                                                                "another model")):
        with pytest.raises(CacheFileError, match=why):
            decode(bad, "id")


def test_concurrent_writers_share_a_directory(tmp_path):
    """Two processes' caches writing the same states at once: every file that exists is whole."""
    caches = [DiskCache(tmp_path, "c" * 32, 1 << 30) for _ in range(2)]
    states = [SavedState(tokens=tuple(range(i, i + 50)), target=os.urandom(200_000)) for i in range(6)]

    def write(cache):
        for st in states:
            cache.store(st)
        cache.flush()

    threads = [threading.Thread(target=write, args=(c,)) for c in caches]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    fresh = DiskCache(tmp_path, "c" * 32, 1 << 30)
    assert len(fresh.index()) == 6 and fresh.refused == 0
    for path in fresh.index():
        assert fresh.load(path) is not None
    for c in caches + [fresh]:
        c.close()


def test_disk_cache_is_bounded(tmp_path):
    cache = DiskCache(tmp_path, "d" * 32, limit=450_000)
    for i in range(5):
        cache.store(SavedState(tokens=(i, i + 1), target=b"x" * 200_000))
        cache.flush()
    assert sum(p.stat().st_size for p in tmp_path.glob("*.apc")) <= 450_000
    assert len(cache.index()) == 2  # the two most recent
    cache.close()


def test_common_prefix():
    assert common_prefix([1, 2, 3], [1, 2, 4]) == 2
    assert common_prefix([], [1]) == 0 and common_prefix([1, 2], [1, 2, 3]) == 2


# ------------------------------------------------------------------------------------------- over gRPC


def test_grpc_options_from_a_localai_yaml_and_cached_counts(hybrid, tmp_path):
    """A LocalAI model YAML's options reach the backend; the final Reply says how much of the prompt was reused,
    and Status counts it."""
    config = yaml.safe_load(f"""
name: hybrid
backend: apexmtp
context_size: 1024
options:
  - spec_type:draft-mtp
  - spec_n_max:4
  - ctx_checkpoints:16
  - checkpoint_min_step:64
  - cache_ram:64
  - cache_idle_slots:true
  - slot_prompt_similarity:0.1
  - prompt_cache_dir:{tmp_path}
""")
    backend = BackendProcess()
    try:
        stub = backend.stub
        res = stub.LoadModel(pb.ModelOptions(ModelFile=str(hybrid), ContextSize=config["context_size"], NBatch=64,
                                             Threads=2, Options=config["options"]), timeout=120)
        assert res.success, res.message
        text = " ".join(f"w{i % 37}" for i in range(300))
        first = stub.Predict(pb.PredictOptions(Prompt=text, Tokens=16, Temperature=0.0, IgnoreEOS=True), timeout=120)
        again = stub.Predict(pb.PredictOptions(Prompt=text, Tokens=16, Temperature=0.0, IgnoreEOS=True), timeout=120)
        assert first.cached_prompt_tokens == 0 and again.cached_prompt_tokens >= again.prompt_tokens - 5
        assert again.message == first.message
        mem = stub.Status(pb.HealthMessage()).memory.breakdown
        assert mem["prompt_tokens_cached_total"] == again.cached_prompt_tokens
        assert mem["prompt_cache_hits_checkpoint_total"] == 1 and mem["checkpoints"] > 0
        assert stub.Free(pb.HealthMessage()).success
    except grpc.RpcError as err:
        pytest.fail(f"{err.code()}: {err.details()}\n{backend.stderr()[-3000:]}")
    finally:
        backend.stop()
    assert list(tmp_path.glob("*.apc"))  # the long prompt reached the disk cache


# ------------------------------------------------------------------------------------------- memory plan


@pytest.mark.parametrize("n_max", [0, 4], ids=["plain", "mtp"])
def test_the_estimate_counts_checkpoints_as_the_engine_makes_them(hybrid, smollm2_path, n_max):
    """The plan's checkpoint bytes are what the engine's checkpoints weigh, per checkpoint and in their number."""
    from gallery.catalog import WeightBytes
    from gallery.estimate import ArchFacts, RunConfig, estimate

    s = scheduler(hybrid, n_max=n_max, ram_mib=0, n_checkpoints=4, min_step=64)
    try:
        run(s, tokens(600, 40), 2)
        made, end = s.engine.seqs[0].checkpoints, s.engine.seqs[0].end
        arch = ArchFacts.from_gguf(read_gguf(hybrid))
        run_cfg = RunConfig(n_ctx=N_CTX, mtp=n_max > 0, spec_n_max=n_max, n_checkpoints=4, checkpoint_min_step=64)
        planned = estimate(arch, WeightBytes(0, 0, 0, 0), run_cfg).checkpoints
        assert len(made) == run_cfg.checkpoints_per_slot == 4
        # The state arrays and the prompt end's logits row exactly; llama.cpp's serialisation adds ~100 bytes of
        # cell metadata to each state.
        assert end is not None and end.logits is not None
        assert 0 <= sum(c.nbytes for c in made) + end.nbytes - planned <= 256 * (len(made) + 1)
    finally:
        s.close()
    dense = ArchFacts.from_gguf(read_gguf(smollm2_path))
    # A dense model keeps only its prompt end's logits row.
    assert estimate(dense, WeightBytes(0, 0, 0, 0), RunConfig(n_ctx=N_CTX, n_checkpoints=16)).checkpoints == 4 * dense.n_vocab


# ------------------------------------------------------------------------------------------- faults


def test_a_cancelled_prefill_leaves_only_checkpoints_it_reached(hybrid):
    s = scheduler(hybrid, n_max=4, ram_mib=0)
    try:
        prompt = tokens(700, 50)
        stream = Stream().attach(s, GenerationRequest(prompt=prompt, max_tokens=8, ignore_eos=True))
        for _ in range(4):  # four 64-token prefill chunks, then the client goes away
            s.step()
        s.cancel(stream.ticket)
        s.run_until_idle()
        reached = s.engine.n_past(0)
        assert 0 < reached < len(prompt)
        assert all(c.n_tokens <= reached for c in s.engine.seqs[0].checkpoints)
        got = run(s, prompt)  # the slot resumes where the cancelled prefill stopped
        assert got.cache_source == "slot" and got.n_cached == reached
        assert got.token_ids == cold(hybrid, prompt, n_max=4)
    finally:
        s.close()


def test_a_reload_of_another_model_never_restores_the_first_ones_state(hybrid, synth_model, tmp_path):
    """Over gRPC: the disk cache is keyed by the model file, the RAM cache dies with the model."""
    other = synth_model("predictable", acceptance=0.9)
    backend = BackendProcess()
    text = " ".join(f"w{i % 41}" for i in range(300))

    def load(path):
        res = backend.stub.LoadModel(pb.ModelOptions(ModelFile=str(path), ContextSize=N_CTX, NBatch=64, Threads=2,
                                                     Options=[f"prompt_cache_dir:{tmp_path}",
                                                              "prompt_cache_min_tokens:64"]), timeout=120)
        assert res.success, res.message

    def ask():
        return backend.stub.Predict(pb.PredictOptions(Prompt=text, Tokens=8, Temperature=0.0, IgnoreEOS=True),
                                    timeout=120)

    try:
        load(hybrid)
        first = ask()
        load(other)  # the first model's slots are written to disk as it goes
        fresh = ask()
        assert fresh.cached_prompt_tokens == 0
        load(hybrid)
        back = ask()
        assert back.cached_prompt_tokens >= back.prompt_tokens - 8 and back.message == first.message
        mem = backend.stub.Status(pb.HealthMessage()).memory.breakdown
        assert mem["prompt_cache_hits_disk_total"] == 1 and mem["prompt_cache_disk"] > 0
    except grpc.RpcError as err:
        pytest.fail(f"{err.code()}: {err.details()}\n{backend.stderr()[-3000:]}")
    finally:
        backend.stop()
