"""The pure pieces of `apexmtp run`: OpenAI JSON -> proto, Reply -> OpenAI JSON, config -> LoadModel, demo options."""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import pytest

from backend.api.demo import DEMOS, is_demo, merge_options
from backend.api.openai_api import (
    INT32_MAX,
    Job,
    ServedModel,
    StreamFormatter,
    body_params,
    chat_request,
    completion_request,
    completion_response,
    http_error,
    is_bug,
    legacy_logprobs,
    timings,
)
from backend.api.supervisor import model_options
from backend.core.errors import (
    STATUSES,
    ChecksumMismatchError,
    ContextOverflowError,
    EngineClosedError,
    EntryNotFoundError,
    InvalidRequestError,
    ModelLoadError,
    ModelMismatchError,
    ModelNotFoundError,
    NoModelLoadedError,
    RequestTooLargeError,
    SchemaError,
    UnauthorizedError,
)
from backend.proto import backend_pb2 as pb

MODEL = ServedModel(name="m", aliases=frozenset({"demo"}), context_size=1024, identity="m.gguf", embeddings=False,
                    mtp=True, defaults={"temperature": 0.6, "top_k": 20})
HI = [{"role": "user", "content": "hi"}]
TOOLS = [{"type": "function", "function": {"name": "f"}}]


class Err(grpc.RpcError):
    """A backend error as a grpc call raises it: a code, details, and the trailing metadata naming class and field."""

    def __init__(self, code, details, error_type="", param=""):
        self._code, self._details = code, details
        self._trailing = tuple((k, v) for k, v in (("apexmtp-error", error_type), ("apexmtp-param", param)) if v)

    def code(self):
        return self._code

    def details(self):
        return self._details

    def trailing_metadata(self):
        return self._trailing


def test_defaults_layer_under_the_request():
    r = chat_request({"messages": HI}, MODEL)
    assert (r.Temperature, r.TopK, r.TopP) == (pytest.approx(0.6), 20, pytest.approx(0.95))  # config, then server
    assert r.Tokens == 1024 and r.Seed == 0 and r.UseTokenizerTemplate and r.ModelIdentity == "m.gguf"
    r = chat_request({"messages": HI, "temperature": 0, "top_k": 0, "max_tokens": 5, "seed": 0}, MODEL)
    assert (r.Temperature, r.TopK, r.Tokens) == (0, 0, 5)
    assert r.Seed == INT32_MAX  # seed 0 must stay fixed; 0 on the wire would mean "random"


def test_chat_fields_pass_through():
    tools = TOOLS
    body = {"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
                         {"role": "assistant", "content": None, "tool_calls": [{"id": "1"}]}],
            "tools": tools, "tool_choice": "auto", "stop": "x", "logprobs": True, "top_logprobs": 2,
            "chat_template_kwargs": {"enable_thinking": False}, "reasoning_effort": "low"}
    r = chat_request(body, MODEL)
    assert r.Messages[0].content == "ab" and json.loads(r.Messages[1].tool_calls) == [{"id": "1"}]
    assert json.loads(r.Tools) == tools and json.loads(r.ToolChoice) == "auto" and list(r.StopPrompts) == ["x"]
    assert (r.Logprobs, r.TopLogprobs) == (1, 2)
    assert json.loads(r.Metadata["chat_template_kwargs"]) == {"enable_thinking": False}
    # LocalAI's wire: the backend hides the tools under "none" (tests/test_agents.py sees the prompt without them).
    assert json.loads(chat_request({**body, "tool_choice": "none"}, MODEL).ToolChoice) == "none"


@pytest.mark.parametrize("body, param", [
    ({"messages": {}}, "messages"),
    ({"messages": HI, "max_tokens": 0}, "max_tokens"),  # 0 on the wire would mean "unset"
    ({"messages": HI, "temperature": "hot"}, "temperature"),
    ({"messages": HI, "top_k": 1.5}, "top_k"),
    ({"messages": HI, "n": 2}, "n"),
    ({"messages": HI, "stop": [1]}, "stop"),
    ({"messages": HI, "top_logprobs": 2}, "top_logprobs"),
    ({"messages": HI, "response_format": {"type": "yaml"}}, "response_format"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages[0].content[0].image_url"),
    ({"messages": HI, "seed": 2**40}, "seed"),
    ({"messages": HI, "tool_choice": "required"}, "tool_choice"),  # the backend lets LocalAI send it without Tools
    ({"messages": HI, "logit_bias": {"1": 500}}, "logit_bias"),  # OpenAI's range; the backend takes llama-server's
])
def test_bad_chat_requests_name_the_field(body, param):
    with pytest.raises(InvalidRequestError) as err:
        chat_request(body, MODEL)
    assert err.value.param == param
    status, out = http_error(err.value)
    assert status == 400 and out["error"]["param"] == param


@pytest.mark.parametrize("kind, body, field, param", [
    ("chat", {"messages": []}, "Messages", "messages"),
    ("chat", {"messages": HI, "max_completion_tokens": -3}, "Tokens", "max_completion_tokens"),
    ("chat", {"messages": HI, "max_tokens": -3}, "Tokens", "max_tokens"),
    ("chat", {"messages": HI, "logprobs": True, "top_logprobs": 25}, "TopLogprobs", "top_logprobs"),
    ("chat", {"messages": HI, "tools": [1]}, "Tools[0]", "tools[0]"),
    ("chat", {"messages": HI, "tools": [{"function": {"name": "f", "parameters": 3}}]},
     "Tools[0].function.parameters", "tools[0].function.parameters"),
    ("chat", {"messages": HI, "tools": TOOLS, "tool_choice": "required", "grammar": 'root ::= "x"'},
     "ToolChoice", "tool_choice"),
    ("chat", {"messages": HI, "tool_choice": "sometimes"}, "ToolChoice", "tool_choice"),
    ("chat", {"messages": HI, "logit_bias": {"x": 1}}, "LogitBias", "logit_bias"),
    ("chat", {"messages": HI, "chat_template_kwargs": [1]}, "Metadata.chat_template_kwargs", "chat_template_kwargs"),
    ("text", {"prompt": ""}, "Prompt", "prompt"),
    ("text", {"prompt": "a", "logprobs": 21}, "TopLogprobs", "logprobs"),
])
def test_the_backend_judges_values_and_its_errors_name_the_body_field(kind, body, field, param):
    request = (chat_request if kind == "chat" else completion_request)(body, MODEL)  # not refused at the edge
    assert request.ByteSize() > 0
    err = Err(grpc.StatusCode.INVALID_ARGUMENT, "bad value", "InvalidRequestError", field)
    status, out = http_error(err, body_params(kind, body))
    assert status == 400 and out["error"]["param"] == param and out["error"]["message"] == "bad value"


def test_completion_request():
    r = completion_request({"prompt": ["once"], "logprobs": 3, "max_tokens": 2}, MODEL)
    assert (r.Prompt, r.Logprobs, r.TopLogprobs, r.Tokens, r.UseTokenizerTemplate) == ("once", 1, 3, 2, False)
    bad_bodies = ({"prompt": 5}, {"prompt": ["a", "b"]}, {"prompt": "a", "echo": True}, {"prompt": "a", "n": 2})
    for bad in bad_bodies:
        with pytest.raises(InvalidRequestError):
            completion_request(bad, MODEL)


def final_reply(**kw) -> pb.Reply:
    base = {"tokens": 11, "prompt_tokens": 4, "timing_prompt_processing": 20.0, "timing_token_generation": 100.0,
            "draft_n": 12, "draft_n_accepted": 9, "finish_reason": "length"}
    return pb.Reply(**{**base, **kw})


def test_timings_are_llama_server_shaped():
    t = timings(final_reply())
    assert t["predicted_n"] == 11 and t["predicted_per_second"] == pytest.approx(100.0)  # 10 steps in 100 ms
    assert t["prompt_per_second"] == pytest.approx(200.0) and t["prompt_per_token_ms"] == pytest.approx(5.0)
    assert (t["draft_n"], t["draft_n_accepted"]) == (12, 9)
    assert timings(pb.Reply())["predicted_per_second"] == 0.0


def test_finish_reasons_and_tool_calls():
    job = Job("chat", pb.PredictOptions(Tokens=11), MODEL)
    for reason in ("length", "stop"):  # the backend's, as it is
        reply = final_reply(chat_deltas=[pb.ChatDelta(content="hey")], finish_reason=reason)
        assert completion_response(job, reply)["choices"][0]["finish_reason"] == reason
    call = pb.ToolCallDelta(index=0, id="call_0", name="f", arguments='{"a": 1}')
    out = completion_response(job, final_reply(chat_deltas=[pb.ChatDelta(tool_calls=[call])],
                                               finish_reason="tool_calls"))
    choice = out["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
    assert choice["message"]["tool_calls"] == [{"id": "call_0", "type": "function",
                                                "function": {"name": "f", "arguments": '{"a": 1}'}}]


def test_stream_formatter_chat():
    job = Job("chat", pb.PredictOptions(Tokens=11), MODEL, stream=True, include_usage=True)
    fmt = StreamFormatter(job)
    assert fmt.opening()[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    chunk = fmt.delta(pb.Reply(chat_deltas=[pb.ChatDelta(content="a", reasoning_content="r")]))
    assert chunk["choices"][0]["delta"] == {"content": "a", "reasoning_content": "r"}
    assert fmt.delta(pb.Reply(tokens=3)) is None
    closing = fmt.closing(final_reply())
    assert closing[0]["choices"][0]["finish_reason"] == "length" and closing[0]["timings"]["draft_n"] == 12
    assert closing[-1]["choices"] == [] and closing[-1]["usage"]["total_tokens"] == 15
    assert len({c["id"] for c in closing}) == 1


def test_legacy_logprobs_offsets():
    items = [{"token": "ab", "logprob": -0.1, "top_logprobs": [{"token": "ab", "logprob": -0.1}]},
             {"token": "c", "logprob": -2.0, "top_logprobs": []}]
    out = legacy_logprobs(items, offset=5)
    assert out["tokens"] == ["ab", "c"] and out["text_offset"] == [5, 7]
    assert out["top_logprobs"] == [{"ab": -0.1}, {}]
    # The backend's chat object is forwarded as it is, and reshaped for text completions.
    raw = json.dumps({"content": items}).encode()
    reply = final_reply(message=b"abc", logprobs=raw)
    chat = completion_response(Job("chat", pb.PredictOptions(Logprobs=1), MODEL), reply)["choices"][0]
    assert chat["logprobs"] == {"content": items}
    text = completion_response(Job("text", pb.PredictOptions(Logprobs=1), MODEL), reply)["choices"][0]
    assert text["logprobs"] == legacy_logprobs(items)
    assert completion_response(Job("text", pb.PredictOptions(), MODEL), reply)["choices"][0]["logprobs"] is None


def test_grpc_errors_map_to_http():
    # The backend names its error class in the trailing metadata; the message is never parsed.
    overflow = Err(grpc.StatusCode.INVALID_ARGUMENT, "prompt is 9 tokens ...", "ContextOverflowError")
    status, body = http_error(overflow)
    assert status == 400 and body["error"]["code"] == "context_length_exceeded"
    assert http_error(Err(grpc.StatusCode.INVALID_ARGUMENT, "the context window is 4"))[1]["error"]["code"] is None
    # UNAVAILABLE: the backend died, or unloaded the model while the request ran.
    unloaded = Err(grpc.StatusCode.UNAVAILABLE, "the model was unloaded while this request was running")
    assert http_error(unloaded)[0] == 503
    assert http_error(Err(grpc.StatusCode.INTERNAL, "boom"))[0] == 500
    assert not is_bug(Err(grpc.StatusCode.INTERNAL, "boom"))  # the backend logged it already
    bare = grpc.RpcError()  # no call behind it: no code, no metadata
    bare.code = lambda: grpc.StatusCode.CANCELLED
    bare.details = lambda: ""
    assert http_error(bare)[0] == 503


def test_one_table_gives_every_error_class_its_grpc_code_and_http_status():
    for cls, status in STATUSES:
        assert grpc.StatusCode[status.grpc] and 400 <= status.http < 600, cls
    from backend.service.servicer import status_for

    assert status_for(ContextOverflowError(9, 4)) == grpc.StatusCode.INVALID_ARGUMENT
    assert status_for(EngineClosedError("gone")) == grpc.StatusCode.UNAVAILABLE
    assert status_for(ModelLoadError("no")) == grpc.StatusCode.INTERNAL  # LoadModel answers in-band
    assert status_for(KeyError("bug")) == grpc.StatusCode.INTERNAL


@pytest.mark.parametrize("exc, status, code", [
    (ContextOverflowError(9, 4), 400, "context_length_exceeded"),
    (InvalidRequestError("bad"), 400, None),
    (EntryNotFoundError("no such model"), 404, "model_not_found"),
    (ModelNotFoundError("/x.gguf"), 404, "model_not_found"),
    (ModelMismatchError("other model"), 404, "model_not_found"),
    (NoModelLoadedError("loading"), 503, None),
    (EngineClosedError("unloaded"), 503, None),
    (ModelLoadError("could not load"), 503, None),
    (ChecksumMismatchError("/x", "a" * 64, "b" * 64), 502, "download_failed"),
    (SchemaError("index.yaml", "e", "f", "bad"), 500, None),  # ours, and it explains itself: no traceback
    (RequestTooLargeError("too big"), 413, "request_too_large"),
    (UnauthorizedError("no key"), 401, "invalid_api_key"),
])
def test_our_errors_map_to_http(exc, status, code):
    got, body = http_error(exc)
    assert (got, body["error"]["code"]) == (status, code) and body["error"]["message"] == str(exc)
    assert not is_bug(exc)


@pytest.mark.parametrize("exc", [KeyError("k"), IndexError("i"), LookupError("l"), ValueError("v"), TypeError("t")])
def test_anything_else_is_a_500_bug(exc):
    # These used to read as client mistakes (KeyError/IndexError/LookupError -> 404 model_not_found).
    status, body = http_error(exc)
    assert status == 500 and body["error"]["type"] == "server_error" and type(exc).__name__ in body["error"]["message"]
    assert is_bug(exc)


@pytest.mark.parametrize("extra, param", [
    ({"top_k": 10**12}, "top_k"),  # used to escape as protobuf's ValueError: a 500 for a client's mistake
    ({"repeat_last_n": -2**40}, "repeat_last_n"),
    ({"top_logprobs": 2**40, "logprobs": True}, "top_logprobs"),
    ({"max_tokens": 10**400}, "max_tokens"),
    ({"temperature": float("nan")}, "temperature"),
    ({"top_p": float("inf")}, "top_p"),
])
def test_out_of_range_numbers_are_400(extra, param):
    with pytest.raises(InvalidRequestError) as err:
        chat_request({"messages": HI, **extra}, MODEL)
    assert err.value.param == param and http_error(err.value)[0] == 400


def test_model_options_from_a_localai_config(tmp_path: Path):
    config = {"parameters": {"model": "sub/x.gguf", "temperature": 0.7}, "context_size": 8192, "gpu_layers": 99,
              "flash_attention": True, "cache_type_k": "q8_0", "cache_type_v": "q8_0", "mmap": True,
              "options": ["use_jinja:true", "spec_type:draft-mtp"]}
    m = model_options(config, tmp_path, threads=3)
    assert (m.Model, m.ModelFile, m.ModelPath) == ("sub/x.gguf", str(tmp_path / "sub/x.gguf"), str(tmp_path))
    assert (m.ContextSize, m.NGPULayers, m.Threads, m.FlashAttention) == (8192, 99, 3, "on")
    assert (m.CacheTypeKey, m.CacheTypeValue, m.MMap, m.Embeddings) == ("q8_0", "q8_0", True, False)
    assert list(m.Options) == ["use_jinja:true", "spec_type:draft-mtp"]
    assert model_options({**config, "parameters": {"model": "/abs/y.gguf"}}, tmp_path).ModelFile == "/abs/y.gguf"


def test_demo_options_override_by_key():
    assert is_demo(None) and is_demo("demo") and is_demo("demo-mtp") and not is_demo("qwen3.5-35b-a3b-apex")
    pulled = ["use_jinja:true", "spec_type:draft-mtp", "spec_n_max:6", "spec_p_min:0.75"]
    merged = merge_options(pulled, DEMOS["demo-mtp"].options)
    assert "spec_n_max:4" in merged and "spec_n_max:6" not in merged and "spec_p_min:0.75" in merged
    assert merged.count("spec_type:draft-mtp") == 1
