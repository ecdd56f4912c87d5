"""Agents end to end: structured output and tool calls through `apexmtp run` (the official `openai` client) and
through LocalAI's gRPC wire (`ChatDelta.tool_calls`).

The demo model is SmolLM2-135M: too small to decide on its own to call a tool, so calls come from grammars —
`tool_choice` required/named force them from the first token; under `auto` the lazy grammar waits for the call
marker, which a logit bias toward the marker's tokens makes the model write. The Qwen3-Coder XML syntax runs on
SmolLM2's weights under a Qwen3-Coder-style chat template of our own (a GGUF copy with that template).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import grpc
import jsonschema
import openai
import pytest
from conftest import BackendProcess, smollm2_options
from test_api_server import RunProcess

from backend.proto import backend_pb2 as pb
from backend.proto import backend_pb2_grpc as pb_grpc

ASK = [{"role": "user", "content": "What is the weather in Paris? Answer with the tool."}]
PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age", "color"],
          "properties": {"name": {"type": "string", "maxLength": 12},
                         "age": {"type": "integer", "minimum": 0, "maximum": 120},
                         "color": {"enum": ["red", "green", "blue"]}}}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "additionalProperties": False, "required": ["city", "days"],
                   "properties": {"city": {"type": "string", "enum": ["Paris", "Rome", "Oslo"]},
                                  "days": {"type": "integer", "minimum": 1, "maximum": 7}}}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "Current time in a time zone",
    "parameters": {"type": "object", "additionalProperties": False, "required": ["zone"],
                   "properties": {"zone": {"type": "string", "enum": ["UTC", "CET"]}}}}}
TOOLS = [WEATHER, TIME]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
GREEDY = {"temperature": 0, "max_tokens": 96}


@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    root = tmp_path_factory.mktemp("agents")
    server = RunProcess("--context", "2048", "--parallel", "2",
                        env={"APEXMTP_MODELS_DIR": str(root / "models"), "APEXMTP_CACHE_DIR": str(root / "cache")})
    yield server
    server.stop()


def check_calls(calls, names=None) -> list[tuple[str, dict]]:
    """Every call is well formed (distinct ids, a known function, arguments valid under its schema)."""
    assert calls, "no tool call"
    assert len({c.id for c in calls}) == len(calls) and all(c.id.startswith("call_") for c in calls)
    out = []
    for c in calls:
        assert c.type == "function" and c.function.name in (names or SCHEMAS)
        args = json.loads(c.function.arguments)
        jsonschema.validate(args, SCHEMAS[c.function.name])
        out.append((c.function.name, args))
    return out


def stream(client: openai.OpenAI, **kw) -> tuple[str, dict[int, dict], str | None, list]:
    """Content, tool calls assembled from deltas the way clients do, the finish reason, and the raw deltas."""
    content, calls, finish, deltas = "", {}, None, []
    for chunk in client.chat.completions.create(stream=True, **kw):
        if not chunk.choices:
            continue
        choice = chunk.choices[0]
        finish = choice.finish_reason or finish
        content += choice.delta.content or ""
        for d in choice.delta.tool_calls or []:
            deltas.append(d)
            call = calls.setdefault(d.index, {"id": None, "name": None, "arguments": ""})
            if d.id:
                assert call["id"] is None, "a call's id comes once, in its first delta"
                call["id"], call["name"] = d.id, d.function.name
                assert d.type == "function"
            else:
                assert call["id"] is not None, "the first delta of a call carries its id and name"
            call["arguments"] += d.function.arguments or ""
    return content, calls, finish, deltas


# ------------------------------------------------------------------------------------------ structured output


@pytest.mark.parametrize("strict", [False, True])
def test_json_schema_output_validates(smol, strict):
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": strict}}
    client = smol.client()
    msgs = [{"role": "user", "content": "Describe a person as JSON."}]
    r = client.chat.completions.create(model="demo", messages=msgs, response_format=fmt, **GREEDY)
    assert r.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(r.choices[0].message.content), PERSON)
    content, calls, finish, _ = stream(client, model="demo", messages=msgs, response_format=fmt, **GREEDY)
    assert content == r.choices[0].message.content and not calls and finish == "stop"


def test_json_object_output_is_an_object(smol):
    client = smol.client()
    msgs = [{"role": "user", "content": "Give me a JSON object with a name and a city."}]
    kw = {"model": "demo", "messages": msgs, "response_format": {"type": "json_object"}, "temperature": 0,
          "max_tokens": 200}
    r = client.chat.completions.create(**kw)
    assert isinstance(json.loads(r.choices[0].message.content), dict)
    assert stream(client, **kw)[0] == r.choices[0].message.content


def test_completions_take_response_format_and_json_schema(smol):
    client = smol.client()
    for extra in ({"response_format": {"type": "json_schema", "json_schema": {"schema": PERSON}}},
                  {"json_schema": PERSON}):
        r = client.completions.create(model="demo", prompt="A person as JSON:", temperature=0, max_tokens=96,
                                      extra_body=extra)
        jsonschema.validate(json.loads(r.choices[0].text), PERSON)


def test_structured_output_errors(smol):
    client = smol.client()
    bad = [
        ({"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "integer", "not": {}}}}},
         "response_format", "'not'"),
        ({"response_format": {"type": "json_object"}, "extra_body": {"grammar": 'root ::= "x"'}},
         "response_format", "cannot be combined"),
        ({"response_format": {"type": "yaml"}}, "response_format", "json_schema"),
        ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}},
         "tool_choice", "cannot be combined"),
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice", "nope"),
    ]
    for kw, param, text in bad:
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(model="demo", messages=ASK, max_tokens=4, **kw)
        assert err.value.body["param"] == param and text in err.value.message, kw
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="demo", messages=ASK, max_tokens=4, extra_body={"grammar": "root ::= ("})
    assert "expecting" in err.value.message  # llama.cpp's own reason


# ------------------------------------------------------------------------------------------ tool calls


def test_tool_choice_required_stream_equals_non_stream(smol):
    client = smol.client()
    kw = dict(model="demo", messages=ASK, tools=TOOLS, tool_choice="required", **GREEDY)
    r = client.chat.completions.create(**kw)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and not choice.message.content
    expected = check_calls(choice.message.tool_calls)
    content, calls, finish, _ = stream(client, **kw)
    assert finish == "tool_calls" and content == ""
    assert [(c["name"], json.loads(c["arguments"])) for _, c in sorted(calls.items())] == expected
    assert sorted(calls) == list(range(len(calls)))


def test_named_tool_choice(smol):
    r = smol.client().chat.completions.create(model="demo", messages=ASK, tools=TOOLS, parallel_tool_calls=False,
                                              tool_choice={"type": "function", "function": {"name": "get_time"}},
                                              **GREEDY)
    (call,) = r.choices[0].message.tool_calls
    assert check_calls([call], names=["get_time"])[0][0] == "get_time"


def test_tool_choice_none_hides_the_tools(smol):
    client = smol.client()
    plain = client.chat.completions.create(model="demo", messages=ASK, **GREEDY)
    r = client.chat.completions.create(model="demo", messages=ASK, tools=TOOLS, tool_choice="none", **GREEDY)
    assert not r.choices[0].message.tool_calls and r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens == plain.usage.prompt_tokens  # the tools were not rendered
    with_tools = client.chat.completions.create(model="demo", messages=ASK, tools=TOOLS, max_tokens=1)
    assert with_tools.usage.prompt_tokens > plain.usage.prompt_tokens


def test_tool_choice_auto(smol, smol_vocab):
    """Under auto nothing is constrained until the model writes `<tool_call>`; then the lazy grammar holds the call
    to the tools' schemas. A bias toward the marker's tokens makes this model write it."""
    client = smol.client()
    plain = client.chat.completions.create(model="demo", messages=[{"role": "user", "content": "Say hello."}],
                                           tools=TOOLS, temperature=0, max_tokens=24)
    assert not plain.choices[0].message.tool_calls and "<tool_call>" not in plain.choices[0].message.content
    bias = {str(t): 30 for t in smol_vocab("<tool_call>")}
    kw = {"model": "demo", "messages": ASK, "tools": TOOLS, "temperature": 0, "max_tokens": 160,
          "logit_bias": bias, "parallel_tool_calls": False}  # else this biased model goes on calling until the end
    r = client.chat.completions.create(**kw)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    calls = check_calls(choice.message.tool_calls)
    assert "<tool_call>" not in (choice.message.content or "")
    content, streamed, _, _ = stream(client, **kw)
    assert [(c["name"], json.loads(c["arguments"])) for _, c in sorted(streamed.items())] == calls
    assert content == (choice.message.content or "")


def test_two_parallel_calls_have_distinct_ids(smol):
    calls = [('{"name": "get_weather", "arguments": {"city": "Rome", "days": 2}}'),
             ('{"name": "get_time", "arguments": {"zone": "CET"}}')]
    grammar = "root ::= " + " ".join(json.dumps(f"<tool_call>\n{c}\n</tool_call>\n") for c in calls)
    client = smol.client()
    kw = dict(model="demo", messages=ASK, tools=TOOLS, extra_body={"grammar": grammar}, **GREEDY)
    r = client.chat.completions.create(**kw)
    got = check_calls(r.choices[0].message.tool_calls)
    assert got == [("get_weather", {"city": "Rome", "days": 2}), ("get_time", {"zone": "CET"})]
    content, streamed, finish, deltas = stream(client, **kw)
    assert content == "" and finish == "tool_calls" and sorted(streamed) == [0, 1]
    assert streamed[0]["id"] != streamed[1]["id"]
    assert [(c["name"], json.loads(c["arguments"])) for c in streamed.values()] == got
    assert len(deltas) > 2  # arguments arrive in pieces as they are generated


def test_tool_result_round_trip(smol):
    """An assistant call and its result go back through the template; the prompt shows both."""
    history = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_abc", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Paris", "days": 1}'}}]},
        {"role": "tool", "tool_call_id": "call_abc", "content": "sunny, 24 C"},
    ]
    r = smol.client().chat.completions.create(model="demo", messages=history, tools=TOOLS, **GREEDY)
    assert r.choices[0].finish_reason in ("stop", "length", "tool_calls")
    with grpc.insecure_channel(smol.backend()["addr"]) as channel:
        stub = pb_grpc.BackendStub(channel)
        messages = [pb.Message(role=m["role"], content=m["content"] or "", tool_call_id=m.get("tool_call_id", ""),
                               tool_calls=json.dumps(m["tool_calls"]) if m.get("tool_calls") else "")
                    for m in history]
        tokens = stub.TokenizeString(pb.PredictOptions(Messages=messages, UseTokenizerTemplate=True,
                                                       Tools=json.dumps(TOOLS))).tokens
        prompt = stub.Detokenize(pb.DetokenizeRequest(tokens=tokens)).content
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 1}}\n</tool_call>' in prompt
    assert "<tool_response>\nsunny, 24 C\n</tool_response>" in prompt and '"name": "get_time"' in prompt


def test_logit_bias(smol, smol_vocab):
    client = smol.client()
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    first = client.chat.completions.create(model="demo", messages=msgs, temperature=0, max_tokens=1)
    token = smol_vocab(first.choices[0].message.content)[0]
    banned = client.chat.completions.create(model="demo", messages=msgs, temperature=0, max_tokens=1,
                                            logit_bias={str(token): -100})
    assert banned.choices[0].message.content != first.choices[0].message.content
    boosted = client.chat.completions.create(model="demo", messages=msgs, temperature=0, max_tokens=1,
                                             logit_bias={str(smol_vocab(" banana")[0]): 100})
    assert boosted.choices[0].message.content == smol_vocab.piece(smol_vocab(" banana")[0])
    for bias, where in (({"99999999": 1}, "vocabulary"), ({"x": 1}, "token id"), ({"1": 500}, "-100 to 100")):
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(model="demo", messages=msgs, max_tokens=1, logit_bias=bias)
        assert where in err.value.message and err.value.body["param"] == "logit_bias"


@pytest.fixture(scope="module")
def smol_vocab(smollm2_path):
    """Token ids of a text under SmolLM2's tokenizer (vocabulary only)."""
    from backend.engine.llama import Engine, EngineConfig

    engine = Engine(smollm2_path, EngineConfig(n_ctx=64))

    class Vocab:
        def __call__(self, text: str) -> list[int]:
            return engine.tokenize(text, add_special=False)

        def piece(self, token: int) -> str:
            return engine.piece(token).decode()

    yield Vocab()
    engine.close()


# ------------------------------------------------------------------------------------------ LocalAI's gRPC wire

# A Qwen3-Coder-style template (ours, not Qwen's text): tools in the system turn, calls and results in XML.
XML_TEMPLATE = """{%- if tools %}<|im_start|>system
You can call these functions:
<tools>
{%- for tool in tools %}
{{ tool | tojson }}
{%- endfor %}
</tools>
To call one, reply with:
<tool_call>
<function=NAME>
<parameter=KEY>
VALUE
</parameter>
</function>
</tool_call><|im_end|>
{% endif %}
{%- for message in messages %}
{%- if message.role == "assistant" and message.tool_calls %}<|im_start|>assistant
{%- for tc in message.tool_calls %}
<tool_call>
<function={{ tc.function.name }}>
{%- for k, v in tc.function.arguments | items %}
<parameter={{ k }}>
{{ v if v is string else v | tojson }}
</parameter>
{%- endfor %}
</function>
</tool_call>
{%- endfor %}<|im_end|>
{% elif message.role == "tool" %}<|im_start|>user
<tool_response>
{{ message.content }}
</tool_response><|im_end|>
{% else %}<|im_start|>{{ message.role }}
{{ message.content }}<|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""


@pytest.fixture(scope="module")
def xml_backend(smollm2_path, tmp_path_factory):
    """A backend serving SmolLM2's weights under the Qwen3-Coder-style template, loaded with GrammarTriggers."""
    path = tmp_path_factory.mktemp("xml") / "smollm2-qwen3coder.gguf"
    subprocess.run([sys.executable, "-m", "gguf.scripts.gguf_new_metadata", str(smollm2_path), str(path),
                    "--chat-template", XML_TEMPLATE, "--force"], check=True, capture_output=True)
    backend = BackendProcess()
    res = backend.stub.LoadModel(smollm2_options(Path(path), ContextSize=1024,
                                                 GrammarTriggers=[pb.GrammarTrigger(word="<tool_call>")]))
    assert res.success, res.message
    yield backend
    backend.stop()


def grpc_stream(stub, **kw) -> tuple[str, list[pb.ToolCallDelta], pb.Reply]:
    content, deltas, last = "", [], None
    for reply in stub.PredictStream(pb.PredictOptions(**kw)):
        for d in reply.chat_deltas:
            content += d.content
            deltas += d.tool_calls
        last = reply
    return content, deltas, last


def assemble(deltas: list[pb.ToolCallDelta]) -> dict[int, dict]:
    calls: dict[int, dict] = {}
    for d in deltas:
        call = calls.setdefault(d.index, {"id": d.id, "name": d.name, "arguments": ""})
        assert not d.id or d.id == call["id"]
        call["arguments"] += d.arguments
    return calls


def xml_request(**kw) -> dict:
    messages = [pb.Message(role=m["role"], content=m["content"]) for m in ASK]
    return {"Messages": messages, "UseTokenizerTemplate": True, "Tools": json.dumps(TOOLS), "Tokens": 160,
            "Temperature": 0, **kw}


def test_grpc_xml_tool_calls_stream_and_predict(xml_backend):
    """LocalAI's wire: ToolChoice as LocalAI sends it (JSON), calls in ChatDelta.tool_calls, XML values typed."""
    stub = xml_backend.stub
    req = xml_request(ToolChoice=json.dumps("required"))
    content, deltas, last = grpc_stream(stub, **req)
    assert "<" not in content and last.finish_reason == "tool_calls"
    calls = assemble(deltas)
    assert calls and all(c["id"].startswith("call_") for c in calls.values())
    assert len({c["id"] for c in calls.values()}) == len(calls)
    for call in calls.values():
        jsonschema.validate(json.loads(call["arguments"]), SCHEMAS[call["name"]])
    whole = stub.Predict(pb.PredictOptions(**req))
    (delta,) = whole.chat_deltas
    assert [(c.name, json.loads(c.arguments)) for c in delta.tool_calls] == \
        [(c["name"], json.loads(c["arguments"])) for _, c in sorted(calls.items())]
    assert whole.finish_reason == "tool_calls" and not delta.content


def test_grpc_named_function_and_grammar_triggers(xml_backend):
    stub = xml_backend.stub
    named = json.dumps({"type": "function", "function": {"name": "get_time"}})
    _, deltas, _ = grpc_stream(stub, **xml_request(ToolChoice=named, Metadata={"parallel_tool_calls": "false"}))
    (call,) = assemble(deltas).values()
    assert call["name"] == "get_time" and json.loads(call["arguments"])["zone"] in ("UTC", "CET")
    # LocalAI's own grammar with the model's GrammarTriggers: free text until the trigger, then the grammar.
    grammar = 'root ::= "<tool_call>\\n<function=get_time>\\n<parameter=zone>\\nUTC\\n</parameter>\\n' \
              '</function>\\n</tool_call>"'
    free = stub.Predict(pb.PredictOptions(**xml_request(Grammar=grammar, Tokens=12)))
    assert free.chat_deltas[0].content and not free.chat_deltas[0].tool_calls  # never triggered: unconstrained
    with pytest.raises(grpc.RpcError) as err:
        stub.Predict(pb.PredictOptions(**xml_request(Grammar=grammar, ToolChoice="required")))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
