"""Parallel serving: continuous batching over slots, MTP in every slot, fair and responsive under load.

In-process tests drive `Scheduler.run_until_idle()` (deterministic interleaving); gRPC tests start the backend as
LocalAI does and send concurrent requests. Exactness is checked on clear-margin synthetic models (greedy and seeded
output is the same alone or beside others); on SmolLM2, batched kernels differ from single-token ones by float
noise, so there each token is checked against its own verify row instead.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from conftest import BackendProcess, smollm2_options, wait_until

from backend.core.errors import ContextOverflowError, InvalidRequestError
from backend.engine.generation import GenerationRequest
from backend.engine.llama import Engine, EngineConfig
from backend.engine.sampling import SamplingParams
from backend.engine.scheduler import Scheduler, Stream, collect
from backend.engine.speculative import SpecConfig
from backend.proto import backend_pb2 as pb

SEEDED = SamplingParams(temperature=0.9, top_k=40, top_p=0.95, seed=99)


def scheduler(path, *, n_seq=4, n_max=0, n_ctx=512, adaptive=True) -> Scheduler:
    cfg = EngineConfig(n_ctx=n_ctx, n_seq=n_seq, n_batch=128, n_threads=2, mtp=n_max > 0, n_draft_max=n_max)
    return Scheduler(Engine(path, cfg), SpecConfig(n_max=n_max, adaptive=adaptive))


def requests(s: Scheduler, n: int, max_tokens: int = 48) -> list[GenerationRequest]:
    return [GenerationRequest(prompt=s.engine.tokenize(f"request {i}: tell me something about {i * 7}"),
                              max_tokens=max_tokens + 3 * i, ignore_eos=True,
                              sampling=SEEDED if i % 2 else SamplingParams()) for i in range(n)]


def alone(s: Scheduler, reqs: list[GenerationRequest]):
    out = []
    for r in reqs:
        s.engine.reset()  # nothing cached: each request on its own, from scratch
        out.append(collect(s, r))
    s.engine.reset()
    return out


def together(s: Scheduler, reqs: list[GenerationRequest]):
    streams = [Stream().attach(s, r) for r in reqs]
    s.run_until_idle()
    for st in streams:
        list(st.chunks())
    return [st.result for st in streams]


@pytest.fixture(scope="module")
def p70(synth_model):
    return synth_model("predictable", acceptance=0.7)


@pytest.mark.parametrize("n_max", [0, 4], ids=["plain", "mtp"])
def test_eight_requests_on_four_slots_equal_each_alone(p70, n_max):
    s = scheduler(p70, n_max=n_max, adaptive=False)
    try:
        reqs = requests(s, 8)
        want, got = alone(s, reqs), together(s, reqs)
        assert [r.token_ids for r in got] == [r.token_ids for r in want]
        assert sorted({r.slot for r in got}) == [0, 1, 2, 3]
        if n_max:
            # Every slot drafts exactly as the request did alone in slot 0 (the classic bug: sequence 0 hard-coded
            # in the draft path gives ~0% acceptance on the other slots).
            assert [(r.stats.drafted, r.stats.accepted) for r in got] == [
                (r.stats.drafted, r.stats.accepted) for r in want]
            assert all(r.stats.acceptance_rate > 0.5 for r in got)
    finally:
        s.close()


def test_mtp_in_slots_equals_plain_and_mixed_draft_caps(p70):
    """Requests with different NDraft caps (verify rows of unequal length) beside each other stay exact."""
    plain, mtp = scheduler(p70), scheduler(p70, n_max=4)
    try:
        reqs = [GenerationRequest(prompt=plain.engine.tokenize(f"mixed caps {i}"), max_tokens=40, ignore_eos=True,
                                  n_draft=[None, 1, 2, None][i]) for i in range(4)]
        want = together(plain, reqs)
        got = together(mtp, reqs)
        assert [r.token_ids for r in got] == [r.token_ids for r in want]
        assert got[1].stats.drafted <= got[1].stats.verify_steps  # NDraft=1: one draft per step at most
    finally:
        plain.close()
        mtp.close()


def test_smollm2_every_token_is_its_rows_choice(smollm2_path):
    s = scheduler(smollm2_path)
    try:
        reqs = [GenerationRequest(prompt=s.engine.tokenize(t), max_tokens=32, logprobs=1)
                for t in ("The capital of France is", "Once upon a time", "def fib(n):", "Colors:")]
        streams = [Stream().attach(s, r) for r in reqs]
        s.run_until_idle()
        for st in streams:
            entries = [lp for c in st.chunks() for lp in c.logprobs]
            assert len(entries) == st.result.n_tokens > 0
            assert all(e["token"] == e["top_logprobs"][0]["token"] for e in entries)
    finally:
        s.close()


@pytest.mark.parametrize("sampling", [SamplingParams(), SEEDED], ids=["greedy", "seeded"])
def test_smollm2_answers_are_the_same_alone_or_batched(smollm2_path, sampling):
    """A real model, not a clear-margin synthetic one: with a KV stream per slot (the default) nothing a neighbour
    does changes a request's arithmetic, so its tokens are the same alone, batched, or after prefix reuse."""
    s = scheduler(smollm2_path)
    try:
        reqs = [GenerationRequest(prompt=s.engine.tokenize(f"<|im_start|>user\nName a colour number {i} and say "
                                                           "why.<|im_end|>\n<|im_start|>assistant\n"),
                                  max_tokens=40, ignore_eos=True, sampling=sampling) for i in range(8)]
        want = alone(s, reqs)
        reused = [collect(s, r) for r in reqs]  # one after the other: each reuses the previous one's prefix
        got = together(s, reqs)
        assert [r.token_ids for r in got] == [r.token_ids for r in want] == [r.token_ids for r in reused]
        assert any(r.n_cached for r in reused)
    finally:
        s.close()


def test_stop_string_and_length_end_only_their_slot(p70):
    s = scheduler(p70, n_max=4)
    try:
        base = GenerationRequest(prompt=s.engine.tokenize("stop me early"), max_tokens=60, ignore_eos=True)
        full = alone(s, [base])[0].content
        stop = full[10:13]
        other = GenerationRequest(prompt=s.engine.tokenize("I keep going"), max_tokens=60, ignore_eos=True)
        short = GenerationRequest(prompt=s.engine.tokenize("I am short"), max_tokens=5, ignore_eos=True)
        want_other = alone(s, [other])[0]
        got = together(s, [GenerationRequest(prompt=base.prompt, max_tokens=60, ignore_eos=True, stop=(stop,)),
                           other, short])
        assert got[0].content == full[:full.index(stop)] and got[0].finish_reason == "stop"
        assert got[2].n_tokens == 5 and got[2].finish_reason == "length"
        assert got[1].token_ids == want_other.token_ids and got[1].finish_reason == "length"
    finally:
        s.close()


def test_grammar_and_logprobs_are_per_slot(smollm2_path):
    s = scheduler(smollm2_path)
    try:
        yes_no = GenerationRequest(prompt=s.engine.tokenize("Answer yes or no:"), max_tokens=8,
                                   sampling=SamplingParams(grammar='root ::= "yes" | "no"'))
        digits = GenerationRequest(prompt=s.engine.tokenize("A number:"), max_tokens=6,
                                   sampling=SamplingParams(grammar='root ::= [0-9]+'))
        free = GenerationRequest(prompt=s.engine.tokenize("Say anything:"), max_tokens=12, logprobs=2)
        streams = [Stream().attach(s, r) for r in (yes_no, digits, free)]
        s.run_until_idle()
        chunks = [list(st.chunks()) for st in streams]
        results = [st.result for st in streams]
        assert results[0].content in ("yes", "no")
        assert results[1].content.isdigit()
        assert not any(c.logprobs for c in chunks[0] + chunks[1])
        assert sum(len(c.logprobs) for c in chunks[2]) == results[2].n_tokens
        assert all(len(lp["top_logprobs"]) == 2 for c in chunks[2] for lp in c.logprobs)
    finally:
        s.close()


def test_fifo_admission_and_queued_requests_wait(p70):
    s = scheduler(p70, n_seq=1)
    try:
        streams = [Stream().attach(s, r) for r in requests(s, 3, max_tokens=10)]
        assert s.queue_depth == 3
        s.run_until_idle()
        for st in streams:
            list(st.chunks())
        waits = [st.result.t_queue_ms for st in streams]
        assert waits == sorted(waits) and waits[2] > waits[0]  # served in the order they came
        assert [st.result.slot for st in streams] == [0, 0, 0]
    finally:
        s.close()


def test_each_slot_gets_the_whole_context(p70):
    """The KV buffer holds parallel x n_ctx: all four slots can fill their own context at the same time."""
    s = scheduler(p70, n_ctx=256)
    try:
        long = [s.engine.tokenize(f"{i} " + "word " * 190)[:200] for i in range(4)]
        got = together(s, [GenerationRequest(prompt=p, max_tokens=100, ignore_eos=True) for p in long])
        assert [r.n_tokens for r in got] == [56] * 4  # capped by the slot's context, none by the others
        with pytest.raises(ContextOverflowError):
            s.submit(GenerationRequest(prompt=long[0] + long[1], max_tokens=4), lambda e: None)
    finally:
        s.close()


def test_prefix_reuse_picks_the_slot_holding_the_conversation(p70):
    s = scheduler(p70, n_max=4)
    try:
        first = GenerationRequest(prompt=s.engine.tokenize("a conversation that goes on"), max_tokens=20)
        r1 = together(s, [first, *requests(s, 3, 8)])[0]
        follow = GenerationRequest(prompt=first.prompt + r1.token_ids + s.engine.tokenize(" and on"), max_tokens=8)
        r2 = collect(s, follow)
        assert r2.slot == r1.slot and r2.n_cached >= len(first.prompt) + len(r1.token_ids) - 1
    finally:
        s.close()


def test_closed_engine_refuses_calls(p70):
    s = scheduler(p70, n_max=4)
    engine = s.engine
    s.close()
    s.close()  # idempotent
    from backend.core.errors import EngineClosedError

    with pytest.raises(EngineClosedError):
        engine.tokenize("freed")
    with pytest.raises(EngineClosedError):
        s.submit(GenerationRequest(prompt=[1, 2, 3]), lambda e: None)


def test_bad_grammar_is_refused_before_it_is_queued(smollm2_path):
    s = scheduler(smollm2_path)
    try:
        with pytest.raises(InvalidRequestError):
            s.submit(GenerationRequest(prompt=[1, 2], sampling=SamplingParams(grammar="root ::= (")), lambda e: None)
        assert s.queue_depth == 0
    finally:
        s.close()


# ------------------------------------------------------------------------------------------ over gRPC


@pytest.fixture(scope="module")
def par_backend():
    b = BackendProcess()
    yield b
    b.stop()


def _load(b: BackendProcess, path, *options: str, ctx: int = 1024) -> None:
    res = b.stub.LoadModel(pb.ModelOptions(ModelFile=str(path), ContextSize=ctx, Threads=2, NBatch=64, MMap=True,
                                           Options=["parallel:4", *options], Embeddings=True))
    assert res.success, res.message
    assert "4 slot(s)" in res.message


def _in_flight(stub) -> int:
    """Requests the backend is generating or holding in its queue."""
    figures = stub.Status(pb.HealthMessage()).memory.breakdown
    return figures.get("slots_busy", 0) + figures.get("queue_depth", 0)


def _stream_text(stub, **kw) -> str:
    return "".join(r.message.decode() for r in stub.PredictStream(pb.PredictOptions(**kw)))


def test_grpc_concurrent_streams_equal_sequential_and_health_stays_fast(par_backend, p70):
    stub = par_backend.stub
    _load(par_backend, p70, "spec_n_max:4")
    prompts = [dict(Prompt=f"client {i} asks", Tokens=48 + 4 * i, IgnoreEOS=True, Temperature=0.0) for i in range(8)]
    sequential = [_stream_text(stub, **p) for p in prompts]
    latencies: list[float] = []
    busy_seen: list[int] = []
    stop = threading.Event()

    def probe() -> None:
        while not stop.is_set():
            t = time.perf_counter()
            stub.Health(pb.HealthMessage(), timeout=5)
            latencies.append(time.perf_counter() - t)
            busy_seen.append(stub.Status(pb.HealthMessage(), timeout=5).memory.breakdown["slots_busy"])
            time.sleep(0.02)

    prober = threading.Thread(target=probe)
    prober.start()
    t0 = time.perf_counter()
    try:
        with ThreadPoolExecutor(8) as pool:
            concurrent = list(pool.map(lambda p: _stream_text(stub, **p), prompts))
    finally:
        together = time.perf_counter() - t0
        stop.set()
        prober.join()
    assert concurrent == sequential
    # A Health that waited behind generation would take about as long as the generations; one served at once
    # takes milliseconds (1 s of slack for a busy machine, more when the whole run took long).
    assert latencies and max(latencies) < max(1.0, together / 3), (max(latencies), together)
    assert max(busy_seen) == 4  # 8 requests, 4 slots: the other 4 waited their turn


def test_grpc_cancel_mid_prefill_frees_the_slot_fast(par_backend, p70):
    stub = par_backend.stub
    _load(par_backend, p70, "spec_n_max:4", ctx=8192)
    # ~5.5k tokens of the synthetic vocabulary (11 a repeat): dozens of 64-token prefill steps, inside the 8k context
    long_prompt = "a very long prompt " * 500
    call = stub.PredictStream(pb.PredictOptions(Prompt=long_prompt, Tokens=8))

    def busy() -> int:
        return stub.Status(pb.HealthMessage()).memory.breakdown["slots_busy"]

    wait_until(busy, 60, message="the request never took a slot")
    call.cancel()
    t_cancel = time.perf_counter()
    wait_until(lambda: not busy(), 60, 0.02, message="the slot stayed busy after the cancel")
    freed_after = time.perf_counter() - t_cancel
    assert _stream_text(stub, Prompt="still serving", Tokens=4, IgnoreEOS=True)
    t0 = time.perf_counter()
    _stream_text(stub, Prompt="another long prompt " * 500, Tokens=1, IgnoreEOS=True)
    prefill = time.perf_counter() - t0  # a whole prompt this long, on this machine, now
    # the slot frees at the next step boundary, long before the prompt could have been prefilled
    assert freed_after < max(1.0, prefill / 3), (freed_after, prefill)


def test_grpc_cancel_one_stream_leaves_the_others_exact(par_backend, p70):
    stub = par_backend.stub
    _load(par_backend, p70, "spec_n_max:4")
    prompts = [dict(Prompt=f"steady {i}", Tokens=64, IgnoreEOS=True) for i in range(3)]
    want = [_stream_text(stub, **p) for p in prompts]

    def cancel_early() -> None:
        call = stub.PredictStream(pb.PredictOptions(Prompt="I leave early", Tokens=200, IgnoreEOS=True))
        next(iter(call))
        call.cancel()

    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(_stream_text, stub, **p) for p in prompts] + [pool.submit(cancel_early)]
        got = [f.result() for f in futures[:3]]
        futures[3].result()
    assert got == want


def test_grpc_free_and_load_with_streams_in_flight(par_backend, p70, tiny_nomtp_gguf):
    stub = par_backend.stub
    _load(par_backend, p70, "spec_n_max:4")
    errors: list[grpc.RpcError] = []

    def long_stream() -> None:
        try:
            _stream_text(stub, Prompt="a long answer", Tokens=100000, IgnoreEOS=True)
        except grpc.RpcError as exc:
            errors.append(exc)

    threads = [threading.Thread(target=long_stream) for _ in range(6)]
    for t in threads:
        t.start()
    wait_until(lambda: _in_flight(stub) == 6, 60, message="the 6 streams did not all reach the scheduler")
    assert stub.Free(pb.HealthMessage()).success
    for t in threads:
        t.join(30)
    assert len(errors) == 6
    assert all(e.code() == grpc.StatusCode.UNAVAILABLE and "unloaded" in e.details() for e in errors)
    assert stub.Health(pb.HealthMessage()).message == b"OK"
    # The same again with a LoadModel of another (headless) model instead of Free.
    errors.clear()
    _load(par_backend, p70, "spec_n_max:4")
    threads = [threading.Thread(target=long_stream) for _ in range(3)]
    for t in threads:
        t.start()
    wait_until(lambda: _in_flight(stub) == 3, 60, message="the 3 streams did not all reach the scheduler")
    _load(par_backend, tiny_nomtp_gguf)
    for t in threads:
        t.join(30)
    assert len(errors) == 3 and all(e.code() == grpc.StatusCode.UNAVAILABLE for e in errors)
    # the headless model serves four clients at once
    with ThreadPoolExecutor(4) as pool:
        out = list(pool.map(lambda i: _stream_text(stub, Prompt=f"headless {i}", Tokens=16, IgnoreEOS=True), range(4)))
    assert all(out)


def test_grpc_embeddings_and_tokenizer_beside_generation(par_backend, smollm2_path):
    stub = par_backend.stub
    res = stub.LoadModel(smollm2_options(smollm2_path, Embeddings=True, Options=["parallel:4"]))
    assert res.success, res.message
    want = list(stub.Embedding(pb.PredictOptions(Embeddings="an embedding beside generation")).embeddings)
    want_tokens = list(stub.TokenizeString(pb.PredictOptions(Prompt="tokens beside generation")).tokens)
    with ThreadPoolExecutor(8) as pool:
        gens = [pool.submit(_stream_text, stub, Prompt=f"generate {i}", Tokens=48, IgnoreEOS=True) for i in range(4)]
        embs = [pool.submit(lambda: list(stub.Embedding(pb.PredictOptions(
            Embeddings="an embedding beside generation")).embeddings)) for _ in range(3)]
        toks = [pool.submit(lambda: list(stub.TokenizeString(pb.PredictOptions(
            Prompt="tokens beside generation")).tokens)) for _ in range(3)]
        assert all(g.result() for g in gens)
        for e in embs:
            assert e.result() == pytest.approx(want, abs=1e-5)
        assert all(t.result() == want_tokens for t in toks)
    text = stub.Detokenize(pb.DetokenizeRequest(tokens=want_tokens)).content
    assert text.strip() == "tokens beside generation"
