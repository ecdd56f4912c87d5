"""The backend over real gRPC on loopback, started as LocalAI starts it, with SmolLM2 on real llama.cpp."""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from conftest import RUN_SH, BackendProcess, free_port, smollm2_options, wait_until

from backend.proto import backend_pb2 as pb

GREEDY = dict(Temperature=0.0, Tokens=24)


def predict_text(stub, **kw) -> str:
    return stub.Predict(pb.PredictOptions(**kw)).message.decode()


def stream_replies(stub, **kw) -> list:
    return list(stub.PredictStream(pb.PredictOptions(**kw)))


# ------------------------------------------------------------------------------------------ lifecycle


def test_health_answers_ok_within_seconds(backend):
    assert backend.stub.Health(pb.HealthMessage()).message == b"OK"
    fresh = BackendProcess()
    try:
        assert fresh.wait_healthy() < 30  # seconds, however busy the machine (llama.cpp loads nothing yet)
    finally:
        fresh.stop()


def test_unimplemented_rpc(backend):
    call = backend.channel.unary_unary("/backend.Backend/TTS", request_serializer=lambda x: x,
                                       response_deserializer=lambda x: x)
    with pytest.raises(grpc.RpcError) as err:
        call(b"")
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_sigterm_shuts_down_cleanly(smollm2_path):
    b = BackendProcess()
    assert b.stub.LoadModel(smollm2_options(smollm2_path)).success
    b.proc.send_signal(signal.SIGTERM)
    assert b.proc.wait(20) == 0
    b.stop()


def test_parent_death_stops_backend(tmp_path):
    pidfile = tmp_path / "pid"
    port = free_port()
    # A parent shell starts the backend and exits: the backend must notice and exit too.
    subprocess.run(["bash", "-c", f"{RUN_SH} --addr 127.0.0.1:{port} >/dev/null 2>&1 & echo $! > {pidfile}; sleep 1"],
                   check=True, env={"LOCALAI_BACKEND_PARENT_WATCH_INTERVAL": "0.5s", "PATH": "/usr/bin:/bin"})
    pid = int(pidfile.read_text())

    def gone() -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        return False

    wait_until(gone, 20, 0.2, message="backend outlived its parent")


# ------------------------------------------------------------------------------------------ LoadModel


def _bad_files(tmp_path, smollm2_path):
    text = tmp_path / "notes.gguf"
    text.write_text("this is not a model\n" * 10)
    zero = tmp_path / "zero.gguf"
    zero.write_bytes(b"\0" * 4096)
    corrupt = tmp_path / "corrupt.gguf"
    corrupt.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 10**12, 10**12) + b"\0" * 64)
    truncated = tmp_path / "truncated.gguf"
    with open(smollm2_path, "rb") as src, open(truncated, "wb") as dst:
        dst.write(src.read(2_000_000))
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    return {
        "missing": (tmp_path / "nope.gguf", "not found"),
        "text": (text, "bad magic"),
        "zero": (zero, "zeroed header"),
        "corrupt": (corrupt, "corrupt header"),
        "truncated": (truncated, "truncated"),
        "empty": (empty, "shorter than a GGUF header"),
    }


def test_bad_model_files_fail_cleanly_and_server_survives(backend, tmp_path, smollm2_path):
    for name, (path, expected) in _bad_files(tmp_path, smollm2_path).items():
        res = backend.stub.LoadModel(pb.ModelOptions(ModelFile=str(path), ContextSize=512))
        assert not res.success, name
        assert expected in res.message, (name, res.message)
        assert backend.stub.Health(pb.HealthMessage()).message == b"OK"
    assert backend.stub.LoadModel(smollm2_options(smollm2_path)).success


def test_unsupported_architecture(backend, tmp_path):
    import numpy as np
    from gguf import GGUFWriter

    path = tmp_path / "alien.gguf"
    w = GGUFWriter(str(path), "alienformer")
    w.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    res = backend.stub.LoadModel(pb.ModelOptions(ModelFile=str(path), ContextSize=64))
    assert not res.success and "unsupported architecture" in res.message, res.message
    assert backend.stub.Health(pb.HealthMessage()).message == b"OK"


def test_context_that_does_not_fit(backend, smollm2_path):
    res = backend.stub.LoadModel(smollm2_options(smollm2_path, ContextSize=1 << 28))
    assert not res.success and "does not fit in memory" in res.message, res.message
    assert backend.stub.Health(pb.HealthMessage()).message == b"OK"
    assert backend.stub.LoadModel(smollm2_options(smollm2_path)).success


def test_model_relative_to_model_path(backend, smollm2_path):
    res = backend.stub.LoadModel(pb.ModelOptions(Model=smollm2_path.name, ModelPath=str(smollm2_path.parent),
                                                 ContextSize=512, Threads=2, NBatch=128))
    assert res.success, res.message


def test_bad_option_is_reported(backend, smollm2_path):
    res = backend.stub.LoadModel(smollm2_options(smollm2_path, Options=["spec_n_mx:4"]))
    assert not res.success and "did you mean 'spec_n_max'" in res.message
    res = backend.stub.LoadModel(smollm2_options(smollm2_path, Options=["spec_p_min:2"]))
    assert not res.success and "spec_p_min" in res.message
    res = backend.stub.LoadModel(smollm2_options(smollm2_path, CacheTypeKey="q9_9"))
    assert not res.success and "KV cache type" in res.message


def test_options_parsed_and_plain_model_ignores_mtp(backend, smollm2_path):
    res = backend.stub.LoadModel(smollm2_options(
        smollm2_path, Options=["use_jinja:true", "spec_type:draft-mtp", "spec_n_max:4", "gpu", "flash_attention:on"],
        CacheTypeKey="q8_0", CacheTypeValue="q8_0", FlashAttention="on"))
    assert res.success, res.message
    assert "no MTP head" in res.message
    assert predict_text(backend.stub, Prompt="Hello", **GREEDY)


# ------------------------------------------------------------------------------------------ Predict


def test_predict_and_stream_greedy_identical(smol_backend):
    stub = smol_backend.stub
    kw = dict(Prompt="The capital of France is", **GREEDY)
    text = predict_text(stub, **kw)
    replies = stream_replies(stub, **kw)
    chunks = [r.message for r in replies if r.message]
    assert text and b"".join(chunks).decode() == text
    assert len(chunks) > 1 and chunks[0] != chunks[1]
    final = replies[-1]
    assert final.tokens == 24 and final.prompt_tokens > 0
    assert final.timing_prompt_processing > 0 and final.timing_token_generation > 0
    assert all(r.prompt_tokens == final.prompt_tokens for r in replies)
    assert [r.tokens for r in replies] == sorted(r.tokens for r in replies)
    assert final.finish_reason == "length"
    assert stream_replies(stub, Prompt="The capital of France is", Tokens=40, StopPrompts=["."])[-1].finish_reason == "stop"


def test_chat_template_messages(smol_backend):
    replies = stream_replies(smol_backend.stub, UseTokenizerTemplate=True, Tokens=16,
                             Messages=[pb.Message(role="system", content="Be brief."),
                                       pb.Message(role="user", content="What is 2+2?")])
    content = "".join(d.content for r in replies for d in r.chat_deltas)
    assert content.strip()
    assert replies[-1].prompt_tokens > 10


def test_stop_string_never_leaks(smol_backend):
    stub = smol_backend.stub
    base = predict_text(stub, Prompt="The capital of France is", Tokens=40)
    stop = base.strip().split()[2]  # a word that appears in the greedy continuation
    replies = stream_replies(stub, Prompt="The capital of France is", Tokens=40, StopPrompts=[stop])
    text = b"".join(r.message for r in replies).decode()
    assert stop not in text
    assert base.startswith(text)
    assert text == base[: base.index(stop)]


def test_stream_chunks_are_whole_utf8(smol_backend):
    replies = stream_replies(smol_backend.stub, Prompt="Écris une phrase en français avec des accents: é è à ç ô.",
                             Tokens=48, Temperature=0.9, Seed=3)
    chunks = [r.message for r in replies if r.message]
    assert chunks, "the stream carried no text: nothing was checked"
    for chunk in chunks:
        chunk.decode("utf-8")  # raises if a character was split


def test_seeded_sampling_reproducible(smol_backend):
    kw = dict(Prompt="Once upon a time", Tokens=24, Temperature=1.0, TopK=40, TopP=0.95, MinP=0.05, Seed=1234)
    assert predict_text(smol_backend.stub, **kw) == predict_text(smol_backend.stub, **kw)


def test_model_seed_is_the_default_request_seed(backend, smollm2_path):
    assert backend.stub.LoadModel(smollm2_options(smollm2_path, Seed=42)).success
    kw = dict(Prompt="Once upon a time", Tokens=24, Temperature=1.0)
    assert predict_text(backend.stub, **kw) == predict_text(backend.stub, **kw)
    assert backend.stub.LoadModel(smollm2_options(smollm2_path)).success


def test_penalties_and_ignore_eos(smol_backend):
    r = smol_backend.stub.Predict(pb.PredictOptions(Prompt="a a a a a a", Tokens=12, Penalty=1.3, Repeat=32,
                                                    FrequencyPenalty=0.5, PresencePenalty=0.5, IgnoreEOS=True))
    assert r.tokens == 12


@pytest.mark.parametrize("field,value", [("Temperature", -1.0), ("TopP", 1.5), ("MinP", -0.1), ("TopK", -3),
                                         ("Penalty", -2.0), ("Tokens", -5), ("TopLogprobs", 99)])
def test_bad_sampler_values_rejected(smol_backend, field, value):
    with pytest.raises(grpc.RpcError) as err:
        smol_backend.stub.Predict(pb.PredictOptions(Prompt="hi", **{field: value}))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert smol_backend.stub.Health(pb.HealthMessage()).message == b"OK"


def test_bad_logit_bias_and_grammar_rejected(smol_backend):
    for kw in (dict(LogitBias="{not json"), dict(LogitBias='{"999999999": 5}'), dict(Grammar="root ::= (")):
        with pytest.raises(grpc.RpcError) as err:
            smol_backend.stub.Predict(pb.PredictOptions(Prompt="hi", Tokens=4, **kw))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, kw


def test_logit_bias_bans_token(smol_backend):
    stub = smol_backend.stub
    first = stub.TokenizeString(pb.PredictOptions(Prompt=" Paris")).tokens[0]
    text = predict_text(stub, Prompt="The capital of France is", Tokens=4, LogitBias=json.dumps({str(first): -100}))
    assert not text.startswith(" Paris")


def test_grammar_constrains_output(smol_backend):
    text = predict_text(smol_backend.stub, Prompt="Is the sky blue? Answer:", Tokens=8,
                        Grammar='root ::= " yes" | " no"')
    assert text in (" yes", " no")


def test_logprobs_openai_format(smol_backend):
    r = smol_backend.stub.Predict(pb.PredictOptions(Prompt="Hello", Tokens=5, Logprobs=1, TopLogprobs=3))
    data = json.loads(r.logprobs)
    assert len(data["content"]) == 5
    streamed = stream_replies(smol_backend.stub, Prompt="Hello", Tokens=5, Logprobs=1, TopLogprobs=3)
    assert sum(len(json.loads(x.logprobs)["content"]) for x in streamed if x.logprobs) == 5
    for item in data["content"]:
        assert item["logprob"] <= 0 and len(item["top_logprobs"]) == 3
        assert item["top_logprobs"][0]["logprob"] >= item["logprob"] - 1e-6
        assert bytes(item["bytes"]).decode("utf-8", "replace") == item["token"]


def test_context_overflow_is_invalid_argument(smol_backend):
    with pytest.raises(grpc.RpcError) as err:
        smol_backend.stub.Predict(pb.PredictOptions(Prompt="word " * 700, Tokens=4))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "context window" in err.value.details()


def test_empty_request_rejected(smol_backend):
    with pytest.raises(grpc.RpcError) as err:
        smol_backend.stub.Predict(pb.PredictOptions(Tokens=4))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


# ------------------------------------------------------------------------------------- cancel, concurrency


def test_cancelled_stream_frees_model(smol_backend):
    stub = smol_backend.stub
    call = stub.PredictStream(pb.PredictOptions(Prompt="Tell me a long story.", Tokens=400, IgnoreEOS=True))
    got = 0
    for _ in call:
        got += 1
        if got == 3:
            call.cancel()
            break
    wait_until(lambda: stub.Status(pb.HealthMessage()).state == pb.StatusResponse.READY, 30,
               message="model still busy after cancel")  # the token count below says it stopped early
    assert stub.GetMetrics(pb.MetricsRequest()).tokens_generated < 50
    assert predict_text(stub, Prompt="The capital of France is", **GREEDY)


def test_status_busy_while_generating(smol_backend):
    stub = smol_backend.stub
    call = stub.PredictStream(pb.PredictOptions(Prompt="Count to one hundred:", Tokens=200, IgnoreEOS=True))
    next(iter(call))
    assert stub.Status(pb.HealthMessage()).state == pb.StatusResponse.BUSY
    call.cancel()


def test_concurrent_requests_equal_sequential(smol_backend):
    stub = smol_backend.stub
    prompts = ["The capital of France is", "My favourite colour is", "def fibonacci(n):", "Water boils at"]
    sequential = [predict_text(stub, Prompt=p, **GREEDY) for p in prompts]
    with ThreadPoolExecutor(4) as pool:
        concurrent = list(pool.map(lambda p: predict_text(stub, Prompt=p, **GREEDY), prompts))
    assert concurrent == sequential


# ------------------------------------------------------------------------------------- other RPCs


def test_tokenize_detokenize_roundtrip(smol_backend):
    stub = smol_backend.stub
    tok = stub.TokenizeString(pb.PredictOptions(Prompt="Hello world"))
    assert tok.length == len(tok.tokens) > 0
    assert stub.Detokenize(pb.DetokenizeRequest(tokens=tok.tokens)).content == "Hello world"
    with pytest.raises(grpc.RpcError) as err:
        stub.Detokenize(pb.DetokenizeRequest(tokens=[10**8]))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_status_metrics_metadata(smol_backend):
    stub = smol_backend.stub
    predict_text(stub, Prompt="Hi", Tokens=8)
    st = stub.Status(pb.HealthMessage())
    assert st.state == pb.StatusResponse.READY
    assert st.memory.total > 0
    assert st.memory.breakdown["weights"] > 50_000_000 and st.memory.breakdown["target_kv"] > 0
    m = stub.GetMetrics(pb.MetricsRequest())
    assert m.tokens_generated == 8 and m.prompt_tokens_processed > 0 and m.tokens_per_second > 0
    meta = stub.ModelMetadata(pb.ModelOptions())
    assert "<|im_start|>user" in meta.rendered_template and not meta.supports_thinking


def test_model_identity_mismatch(smol_backend, smollm2_path):
    with pytest.raises(grpc.RpcError) as err:
        smol_backend.stub.Predict(pb.PredictOptions(Prompt="hi", Tokens=2, ModelIdentity="other-model.gguf"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert "model identity mismatch" in err.value.details()
    assert predict_text(smol_backend.stub, Prompt="hi", Tokens=2, ModelIdentity=smollm2_path.name)


def test_embeddings(backend, smollm2_path):
    stub = backend.stub
    assert stub.LoadModel(smollm2_options(smollm2_path, Embeddings=True)).success
    a = stub.Embedding(pb.PredictOptions(Embeddings="The cat sat on the mat."))
    b = stub.Embedding(pb.PredictOptions(Embeddings="The cat sat on the mat."))
    assert a.dim == 576 and len(a.embeddings) == 576 and list(a.embeddings) == list(b.embeddings)
    assert a.prompt_tokens > 0 and a.layout == pb.EMBEDDING_LAYOUT_FINAL
    assert stub.LoadModel(smollm2_options(smollm2_path)).success
    with pytest.raises(grpc.RpcError) as err:
        stub.Embedding(pb.PredictOptions(Embeddings="x"))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_free_then_predict_fails_precondition(backend, smollm2_path):
    stub = backend.stub
    assert stub.LoadModel(smollm2_options(smollm2_path)).success
    assert stub.Free(pb.HealthMessage()).success
    assert stub.Status(pb.HealthMessage()).state == pb.StatusResponse.UNINITIALIZED
    with pytest.raises(grpc.RpcError) as err:
        stub.Predict(pb.PredictOptions(Prompt="hi"))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert stub.LoadModel(smollm2_options(smollm2_path)).success


def test_auth_token_required():
    b = BackendProcess(env={"LOCALAI_GRPC_AUTH_TOKEN": "s3cret"})
    try:
        for md in (None, [("authorization", "Bearer wrong")]):
            with pytest.raises(grpc.RpcError) as err:
                b.stub.Health(pb.HealthMessage(), metadata=md)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as err:
            list(b.stub.PredictStream(pb.PredictOptions(Prompt="x")))
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        ok = b.stub.Health(pb.HealthMessage(), metadata=[("authorization", "Bearer s3cret")])
        assert ok.message == b"OK"
    finally:
        b.stop()


def test_run_sh_works_from_any_cwd(tmp_path):
    b = BackendProcess(cwd=str(tmp_path))
    try:
        assert b.stub.Health(pb.HealthMessage()).message == b"OK"
    finally:
        b.stop()


def test_a_bug_in_a_handler_is_internal_with_one_logged_traceback(monkeypatch, caplog):
    # A KeyError used to be answered NOT_FOUND (a client's mistake) and logged nowhere.
    import asyncio
    import logging

    from backend.proto import backend_pb2_grpc as pb_grpc
    from backend.service import servicer as servicer_mod

    def broken(self, request):
        return {}["model"]

    monkeypatch.setattr(servicer_mod.BackendServicer, "_loaded", broken)

    async def call() -> tuple[grpc.StatusCode, str, tuple]:
        server = grpc.aio.server()
        pb_grpc.add_BackendServicer_to_server(servicer_mod.BackendServicer(), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                try:
                    await pb_grpc.BackendStub(channel).Predict(pb.PredictOptions(Prompt="hi"))
                except grpc.aio.AioRpcError as err:
                    return err.code(), err.details(), tuple(err.trailing_metadata() or ())
                raise AssertionError("Predict succeeded through a KeyError")
        finally:
            await server.stop(None)

    with caplog.at_level(logging.ERROR, logger="backend.service.servicer"):
        code, details, trailers = asyncio.run(call())
    assert code == grpc.StatusCode.INTERNAL and "model" in details
    assert not any(k == "apexmtp-error" for k, _ in trailers)  # not one of our typed errors
    logged = [r for r in caplog.records if r.exc_info]
    assert len(logged) == 1 and logged[0].exc_info[0] is KeyError
