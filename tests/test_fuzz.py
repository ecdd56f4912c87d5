"""Generated requests against the real servers: no request may kill the backend, and none may look like a bug.

Every PredictOptions field the backend reads (and OpenAI bodies through `apexmtp run`) gets values from the edges:
NaN/inf/negative numbers, broken and self-completing grammars, LogitBias maps that ban what the grammar needs,
unknown token ids, empty and odd prompts, IgnoreEOS. Each call must end in OK or a client-error status (never
INTERNAL / 500), and the backend must answer Health after every one of them.
"""

from __future__ import annotations

import json
import math

import grpc
import pytest
from conftest import BackendProcess, smollm2_options
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_api_server import RunProcess

from backend.proto import backend_pb2 as pb

CLIENT_ERRORS = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.NOT_FOUND,
                 grpc.StatusCode.RESOURCE_EXHAUSTED}
FUZZ = settings(max_examples=40, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

floats = st.one_of(st.floats(allow_nan=True, allow_infinity=True, width=32),
                   st.sampled_from([0.0, 0.5, 1.0, 2.0, -1.0]))
ints = st.one_of(st.integers(-3, 70), st.sampled_from([0, 1, 2**31 - 1, -(2**31)]))
grammars = st.sampled_from(["", 'root ::= "a"', 'root ::= "a"+', 'root ::= [0-9]{1,3}', "root ::= (",
                            'root ::= "yes" | "no"', "not a grammar", 'root ::= x\nx ::= "b"'])
bias_maps = st.one_of(
    st.just(""), st.just("{"), st.just("[1, 2]"), st.just('{"x": 1}'),
    st.dictionaries(st.integers(-5, 70000).map(str), st.one_of(st.floats(-200, 200), st.just(False)),
                    max_size=4).map(json.dumps),
)
texts = st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=40)
messages = st.lists(st.builds(pb.Message, role=st.sampled_from(["user", "assistant", "system", "tool", "x"]),
                              content=texts), max_size=3)
predict_options = st.builds(
    pb.PredictOptions, Prompt=texts, Tokens=st.integers(-5, 48), Temperature=floats, TopK=ints, TopP=floats,
    MinP=floats, Penalty=floats, Repeat=ints, FrequencyPenalty=floats, PresencePenalty=floats,
    Seed=st.integers(-(2**31), 2**31 - 1), IgnoreEOS=st.booleans(), NDraft=st.integers(-3, 20),
    Logprobs=st.integers(0, 1), TopLogprobs=st.integers(-2, 30), Grammar=grammars, LogitBias=bias_maps,
    StopPrompts=st.lists(texts, max_size=2), UseTokenizerTemplate=st.booleans(), Messages=messages,
    Tools=st.sampled_from(["", "[]", "{", '[{"type":"function","function":{"name":"f","parameters":{}}}]']),
)


@pytest.fixture(scope="module")
def fuzz_backend(synth_model):
    b = BackendProcess()
    path = synth_model("predictable", acceptance=0.7)
    res = b.stub.LoadModel(pb.ModelOptions(ModelFile=str(path), ContextSize=256, Threads=1, NBatch=64,
                                           Options=["parallel:2", "spec_n_max:3"]))
    assert res.success, res.message
    yield b
    b.stop()


def _call(b: BackendProcess, request: pb.PredictOptions, stream: bool) -> None:
    try:
        if stream:
            for _ in b.stub.PredictStream(request, timeout=120):
                pass
        else:
            b.stub.Predict(request, timeout=120)
    except grpc.RpcError as exc:
        assert exc.code() in CLIENT_ERRORS, f"{exc.code()}: {exc.details()} for {request}"
    assert b.stub.Health(pb.HealthMessage(), timeout=10).message == b"OK", b.stderr()[-3000:]


@FUZZ
@given(request=predict_options, stream=st.booleans())
def test_generated_predict_options_never_kill_the_backend(fuzz_backend, request, stream):
    _call(fuzz_backend, request, stream)


def test_grammar_traps_on_the_synthetic_model(fuzz_backend):
    """The requests that used to abort the process (std::runtime_error: Unexpected empty grammar stack)."""
    stub = fuzz_backend.stub
    r = stub.Predict(pb.PredictOptions(Prompt="hello", Grammar='root ::= "a"', IgnoreEOS=True, Tokens=16))
    assert r.message == b"a" and r.finish_reason == "stop"  # a completed grammar ends the output
    with pytest.raises(grpc.RpcError) as err:
        banned = {str(t): False for t in stub.TokenizeString(pb.PredictOptions(Prompt="a")).tokens}
        stub.Predict(pb.PredictOptions(Prompt="hello", Grammar='root ::= "a"', LogitBias=json.dumps(banned),
                                       Tokens=8))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "bans every token" in err.value.details()
    assert stub.Health(pb.HealthMessage()).message == b"OK"


def test_grammar_complete_with_ignore_eos_on_smollm2(smollm2_path):
    b = BackendProcess()
    try:
        assert b.stub.LoadModel(smollm2_options(smollm2_path)).success
        r = b.stub.Predict(pb.PredictOptions(Prompt="hello", Grammar='root ::= "a"', IgnoreEOS=True, Tokens=16))
        assert r.message == b"a" and r.finish_reason == "stop" and r.tokens == 1
    finally:
        b.stop()


# ------------------------------------------------------------------------------------------ OpenAI bodies


@pytest.fixture(scope="module")
def fuzz_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz-run")
    env = {"APEXMTP_MODELS_DIR": str(root / "models"), "APEXMTP_CACHE_DIR": str(root / "cache")}
    server = RunProcess("demo-mtp", "--context", "256", "--parallel", "2", env=env)
    yield server
    server.stop()


json_values = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(-10, 10**6), floats.filter(math.isfinite),
                                     texts), lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
                                         texts, inner, max_size=3), max_leaves=6)
openai_bodies = st.fixed_dictionaries(
    {"messages": st.one_of(st.just([{"role": "user", "content": "hi"}]), st.lists(
        st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system", "tool", 3]),
                               "content": st.one_of(texts, json_values)}), max_size=3), json_values)},
    optional={"max_tokens": st.one_of(st.integers(-3, 40), json_values), "temperature": json_values,
              "top_p": json_values, "top_k": json_values, "min_p": json_values, "seed": json_values,
              "stop": st.one_of(texts, st.lists(texts, max_size=5), json_values), "stream": st.booleans(),
              "logprobs": json_values, "top_logprobs": json_values, "n": json_values, "tools": json_values,
              "tool_choice": json_values, "response_format": json_values, "logit_bias": json_values,
              "stream_options": json_values, "model": json_values, "grammar": grammars},
)


@FUZZ
@given(body=openai_bodies)
def test_generated_openai_bodies_never_get_a_500(fuzz_run, body):
    status, reply = fuzz_run.request("POST", "/v1/chat/completions", json.dumps(body).encode(), timeout=120)
    assert status in (200, 400, 404, 413, 422), (status, reply, body)
    assert fuzz_run.request("GET", "/health")[0] == 200, fuzz_run.output()[-3000:]
