"""backend.service.grammars against llama.cpp's own grammar engine: every grammar parses, valid JSON is accepted and
invalid JSON refused, token by token, by the real sampler (SmolLM2's vocabulary); unsupported keywords are named."""

from __future__ import annotations

import ctypes
import json
import math

import llama_cpp.llama_cpp as L
import pytest

from backend.core.errors import InvalidRequestError
from backend.engine.sampling import Sampler, SamplingParams
from backend.service.grammars import response_format_grammar, schema_grammar, tool_call_grammar, trigger_patterns
from backend.service.tools import HERMES, QWEN3_CODER


@pytest.fixture(scope="module")
def accepts(smollm2_path):
    """accepts(grammar, text): does llama.cpp's grammar sampler let `text` through, then allow end of generation?"""
    from backend.engine.llama import Engine, EngineConfig

    engine = Engine(smollm2_path, EngineConfig(n_ctx=64))
    eos = L.llama_vocab_eos(engine.vocab)

    def allowed(smpl, token: int) -> bool:
        data = (L.llama_token_data * 1)()
        data[0].id, data[0].logit, data[0].p = token, 0.0, 0.0
        arr = L.llama_token_data_array(data, 1, -1, False)
        L.llama_sampler_apply(smpl, ctypes.byref(arr))
        return not math.isinf(data[0].logit)

    def check(grammar: str, text: str) -> bool:
        with Sampler(SamplingParams(grammar=grammar), engine.vocab, engine.n_vocab) as sampler:
            smpl = sampler._grammar
            for token in engine.tokenize(text, add_special=False, parse_special=False):
                if not allowed(smpl, token):
                    return False
                L.llama_sampler_accept(smpl, token)
            return allowed(smpl, eos)

    yield check
    engine.close()


PERSON = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
          "required": ["name", "age"]}
TREE = {"$defs": {"node": {"type": "object", "additionalProperties": False, "required": ["v", "kids"],
                           "properties": {"v": {"type": "integer"},
                                          "kids": {"type": "array", "items": {"$ref": "#/$defs/node"}}}}},
        "$ref": "#/$defs/node"}
STRICT = {"type": "object", "additionalProperties": False, "required": ["city", "unit", "days"],
          "properties": {"city": {"type": "string"}, "unit": {"type": ["string", "null"], "enum": ["c", "f", None]},
                         "days": {"type": "array", "items": {"type": "integer"}}}}
# (schema, valid values, invalid values). llama-cpp-python's port (llama_cpp.llama_grammar.json_schema_to_gbnf)
# gets 20 of these 26 right: it ignores integer bounds, mis-escapes enum strings with quotes (the grammar does
# not parse), fails on recursive $ref, and mishandles {} and additionalProperties: true. llama.cpp's C++
# converter gets all but `number minimum`, which it ignores (refused here).
CASES = [
    (PERSON, [{"name": "a", "age": 3}], [{"name": "a"}, {"age": 3, "name": "a", "x": 1}]),
    ({"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "string"}}},
     [{}, {"a": 1}, {"b": "x"}, {"a": 1, "b": "x"}], [{"c": 1}]),
    ({"type": "object", "additionalProperties": {"type": "integer"}}, [{}, {"x": 1, "y": 2}], [{"x": "s"}]),
    ({"type": "object", "properties": {"a": {"type": "integer"}}, "additionalProperties": True},
     [{"a": 1, "z": [1]}], [{"a": "x"}]),
    ({"type": "integer", "minimum": 1, "maximum": 30}, [1, 17, 30], [0, 31, -5, 100]),
    ({"type": "integer", "minimum": -20, "maximum": -3}, [-20, -3, -15], [-2, -21, 0, 5]),
    ({"type": "integer", "exclusiveMinimum": 0}, [1, 99, 123456], [0, -1]),
    ({"type": "integer", "maximum": 5}, [-1000, 0, 5], [6, 50]),
    ({"type": "string", "minLength": 2, "maxLength": 4}, ["ab", "abcd"], ["a", "abcde"]),
    ({"type": "string", "pattern": "^[A-Z]{2}[0-9]{3}$"}, ["AB123"], ["ab123", "AB12"]),
    ({"type": "string", "pattern": "^(yes|no)-\\d+$"}, ["yes-1", "no-42"], ["maybe-1", "yes-"]),
    ({"type": "string", "pattern": "b+"}, ["abba", "b"], ["aaa"]),
    ({"type": "string", "format": "date"}, ["2024-02-29"], ["yesterday"]),
    ({"type": "string", "format": "date-time"}, ["2024-02-29T10:00:00Z"], ["soon"]),
    ({"type": "string", "format": "uuid"}, ["123e4567-e89b-12d3-a456-426614174000"], ["xyz"]),
    ({"type": "string", "enum": ["red", "green", 'a "q"']}, ["red", 'a "q"'], ["blue"]),
    ({"const": {"k": 1}}, [{"k": 1}], [{"k": 2}]),
    ({"anyOf": [{"type": "integer"}, {"type": "string"}]}, [1, "x"], [[1], None]),
    ({"oneOf": [{"type": "boolean"}, {"type": "null"}]}, [True, None], [1]),
    ({"allOf": [{"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]},
                {"type": "object", "properties": {"b": {"type": "string"}}, "required": ["b"]}]},
     [{"a": 1, "b": "x"}], [{"a": 1}]),
    ({"definitions": {"n": {"type": "integer"}}, "type": "array", "items": {"$ref": "#/definitions/n"}},
     [[1, 2]], [["a"]]),
    (TREE, [{"v": 1, "kids": [{"v": 2, "kids": []}]}], [{"v": 1}]),
    ({"type": "array", "items": {"type": "integer"}, "minItems": 1, "maxItems": 3}, [[1], [1, 2, 3]],
     [[], [1, 2, 3, 4], ["a"]]),
    ({"type": "array", "prefixItems": [{"type": "string"}, {"type": "integer"}]}, [["a", 1]], [[1, "a"]]),
    ({}, [1, "x", {"a": [None]}], []),
    ({"type": "object"}, [{}, {"a": 1}], [[1]]),
    (STRICT, [{"city": "P", "unit": None, "days": [1]}, {"city": "P", "unit": "c", "days": []}],
     [{"city": "P", "unit": "k", "days": []}, {"city": "P", "days": []}]),
]


def dumps(value) -> str:
    # const values are matched in compact form; everything else in json.dumps' default layout
    return json.dumps(value, separators=(",", ":")) if isinstance(value, dict) and "k" in value else json.dumps(value)


@pytest.mark.parametrize("schema,good,bad", CASES, ids=[json.dumps(c[0])[:40] for c in CASES])
def test_schema_grammar_accepts_exactly_the_valid(accepts, schema, good, bad):
    grammar = schema_grammar(schema)
    for value in good:
        assert accepts(grammar, dumps(value)), (value, grammar)
    for value in bad:
        assert not accepts(grammar, dumps(value)), (value, grammar)


@pytest.mark.parametrize("schema,keyword", [
    ({"type": "number", "minimum": 0}, "minimum"), ({"type": "integer", "not": {"const": 3}}, "not"),
    ({"type": "object", "if": {}, "then": {}}, "if"), ({"type": "array", "uniqueItems": True}, "uniqueItems"),
    ({"type": "integer", "multipleOf": 5}, "multipleOf"), ({"type": "object", "patternProperties": {}}, "patternProperties"),
    ({"type": "object", "minProperties": 1}, "minProperties"), ({"type": "array", "contains": {}}, "contains"),
    ({"type": "object", "dependentRequired": {}}, "dependentRequired"), ({"type": "string", "format": "email"}, "email"),
    ({"type": "string", "pattern": "^(?=a)b$"}, "lookaround"), ({"$ref": "https://example.com/s.json"}, "only references inside"),
    ({"properties": {"a": {"$ref": "#/$defs/missing"}}}, "does not resolve"),
    ({"$defs": {"s": {"type": "string"}}, "$ref": "#/$defs/s", "maxLength": 3}, "beside \\$ref"),
    ({"type": "array", "maxItems": 5000}, "maxItems"), ({"type": "integer", "minimum": 5, "maximum": 1}, "greater"),
])
def test_unsupported_keywords_are_named(schema, keyword):
    with pytest.raises(InvalidRequestError, match=keyword):
        schema_grammar(schema)


def test_response_format(accepts):
    assert response_format_grammar(None) == response_format_grammar({"type": "text"}) == ""
    obj = response_format_grammar({"type": "json_object"})
    assert accepts(obj, '{"a": [1, {"b": null}]}') and not accepts(obj, "[1]")
    strict = response_format_grammar({"type": "json_schema", "json_schema": {"name": "p", "strict": True,
                                                                             "schema": PERSON}})
    assert accepts(strict, '{"name": "x", "age": 1}')
    for bad in ({"type": "yaml"}, {"type": "json_schema"}, {"type": "json_schema", "json_schema": {"schema": 3}},
                {"type": "json_schema", "json_schema": {"schema": {"type": "integer", "not": {}}}}):
        with pytest.raises(InvalidRequestError) as err:
            response_format_grammar(bad)
        assert err.value.param == "response_format"


TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
            "type": "object", "required": ["city"],
            "properties": {"city": {"type": "string"}, "days": {"type": "integer", "minimum": 1, "maximum": 7}}}}},
         {"type": "function", "function": {"name": "ping"}}]


def test_hermes_tool_grammar(accepts):
    g = tool_call_grammar(HERMES, TOOLS)
    one = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}\n</tool_call>'
    two = one + '\n<tool_call>\n{"name": "ping", "arguments": {}}\n</tool_call>'
    assert accepts(g, one) and accepts(g, two)
    assert not accepts(g, one.replace("3", "9"))  # days out of range
    assert not accepts(g, one.replace("get_weather", "get_time")) and not accepts(g, "Sure! " + one)
    single = tool_call_grammar(HERMES, TOOLS, parallel=False)
    assert accepts(single, one) and not accepts(single, two)
    named = tool_call_grammar(HERMES, TOOLS, name="ping")
    assert not accepts(named, one) and accepts(named, '<tool_call>{"name": "ping", "arguments": {}}</tool_call>')
    thinking = tool_call_grammar(HERMES, TOOLS, thinking=True)
    assert accepts(thinking, "Let me look.\n</think>\n\n" + one) and not accepts(thinking, one)
    with pytest.raises(InvalidRequestError, match="not among the tools"):
        tool_call_grammar(HERMES, TOOLS, name="nope")


def test_qwen3_coder_tool_grammar(accepts):
    g = tool_call_grammar(QWEN3_CODER, TOOLS)
    call = ("<tool_call>\n<function=get_weather>\n<parameter=city>\nNew York\n</parameter>\n"
            "<parameter=days>\n2\n</parameter>\n</function>\n</tool_call>")
    assert accepts(g, call) and accepts(g, call.replace("<parameter=days>\n2\n</parameter>\n", ""))
    assert not accepts(g, call.replace("\n2\n", "\nsoon\n"))  # typed parameter
    assert not accepts(g, call.replace("<parameter=city>\nNew York\n</parameter>\n", ""))  # required parameter
    assert accepts(g, "<tool_call>\n<function=ping>\n</function>\n</tool_call>\n" + call)


def test_trigger_patterns_compile_in_llama_cpp(smollm2_path):
    """Words with regex metacharacters are escaped: llama.cpp compiles the patterns (a bad one would abort)."""
    from backend.engine.llama import Engine, EngineConfig

    patterns = trigger_patterns(["<tool_call>", "[TOOL_CALLS]", "a.b(c)*?+{1}|$^\\"])
    assert patterns[0] == "<tool_call>" and patterns[1] == "\\[TOOL_CALLS\\]"
    engine = Engine(smollm2_path, EngineConfig(n_ctx=64))
    try:
        Sampler(SamplingParams(grammar='root ::= "x"', grammar_triggers=tuple(patterns)), engine.vocab,
                engine.n_vocab).close()
    finally:
        engine.close()


@pytest.mark.parametrize("seeded", [False, True], ids=["greedy", "seeded"])
def test_grammar_output_is_the_same_with_mtp(synth_model, seeded):
    """With a grammar (the check-one-token-then-mask path) MTP output still equals plain decoding token for token,
    and the output follows the grammar."""
    from backend.engine.generation import GenerationRequest
    from backend.engine.llama import Engine, EngineConfig
    from backend.engine.scheduler import Scheduler, collect
    from backend.engine.speculative import SpecConfig

    path = synth_model("predictable", acceptance=0.5)
    grammar = schema_grammar({"type": "array", "items": {"type": "string", "pattern": "^[a-z ]{1,12}$"},
                              "maxItems": 6})
    sampling = SamplingParams(grammar=grammar, **({"temperature": 0.9, "top_k": 40, "seed": 7} if seeded else {}))
    outs = []
    for n_max in (0, 3):
        cfg = EngineConfig(n_ctx=512, n_batch=64, n_ubatch=64, n_threads=2, mtp=n_max > 0, n_draft_max=n_max)
        s = Scheduler(Engine(path, cfg), SpecConfig(n_max=n_max, adaptive=False))
        try:
            outs.append(collect(s, GenerationRequest(prompt=s.engine.tokenize("Names: "), max_tokens=120,
                                                     sampling=sampling)))
        finally:
            s.close()
    plain, mtp = outs
    assert mtp.token_ids == plain.token_ids and mtp.stats.drafted > 0
    if plain.finish_reason == "stop":
        items = json.loads(plain.content)
        assert len(items) <= 6 and all(len(x) <= 12 for x in items)
