"""backend.service.tools (the incremental tool-call parser) and the tool handling of backend.service.chat."""

from __future__ import annotations

import itertools
import json
import random

import pytest

from backend.core.errors import InvalidRequestError
from backend.service.chat import ChatTemplate, ToolPlan, parse_tool_choice, polyfill_messages
from backend.service.tools import HERMES, QWEN3_CODER, ToolCallParser, merge_calls, syntax_for_template, xml_value

TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {
    "city": {"type": "string"}, "days": {"type": "integer"}, "metric": {"type": "boolean"}, "tags": {"type": "array"},
    "note": {"type": ["string", "null"]}}}}}]


def run(syntax, text: str, cuts: list[int]) -> tuple[str, list[tuple[str, str, str]], list]:
    """Feed `text` cut at `cuts`; returns content, whole calls (id, name, arguments) and the raw deltas."""
    ids = itertools.count()
    parser = ToolCallParser(syntax, TOOLS, new_id=lambda: f"call_{next(ids)}")
    content, deltas, pos = "", [], 0
    for cut in [*cuts, len(text)]:
        out = parser.feed(text[pos:cut])
        pos = cut
        content += out.content
        deltas += out.calls
    out = parser.finish()
    content += out.content
    deltas += out.calls
    return content, [(c.id, c.name, c.arguments) for c in merge_calls(deltas)], deltas


HERMES_TWO = ('Sure.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris \\"x\\"", "days": 3}}\n'
              '</tool_call>\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call>\n')
XML_TWO = ("Let me check.\n\n<tool_call>\n<function=get_weather>\n<parameter=city>\nNew\nYork <b>\n</parameter>\n"
           "<parameter=days>\n5\n</parameter>\n<parameter=metric>\nTrue\n</parameter>\n<parameter=tags>\n"
           '["a", "b"]\n</parameter>\n<parameter=note>\nNone\n</parameter>\n</function>\n</tool_call>\n'
           "<tool_call>\n<function=ping>\n</function>\n</tool_call>")
CASES = [
    (HERMES, HERMES_TWO, "Sure.", [("get_weather", {"city": 'Paris "x"', "days": 3}), ("get_weather", {"city": "Rome"})]),
    (HERMES, ('<tool_call>[{"name": "a", "arguments": {}}, {"name": "b", "arguments": {"x": [1, {"y": "}"}]}}]'
              "</tool_call>"), "", [("a", {}), ("b", {"x": [1, {"y": "}"}]})]),  # SmolLM2's list form
    (HERMES, '<tool_call>{"arguments": {"q": 1}, "name": "late"}</tool_call> after', "after", [("late", {"q": 1})]),
    (HERMES, '<tool_call>{"name": "s", "arguments": "{\\"q\\": 2}"}</tool_call>', "", [("s", {"q": 2})]),
    (HERMES, "no calls <tool_ok> and <tool_call>not json</tool_call> end\n",
     "no calls <tool_ok> and <tool_call>not json</tool_call> end\n", []),
    (HERMES, "plain answer, ends with a space ", "plain answer, ends with a space ", []),
    (QWEN3_CODER, XML_TWO, "Let me check.", [
        ("get_weather", {"city": "New\nYork <b>", "days": 5, "metric": True, "tags": ["a", "b"], "note": None}),
        ("ping", {})]),
    (QWEN3_CODER, "<function=get_weather>\n<parameter=city>\nOslo\n</parameter>\n</function> tail", "tail",
     [("get_weather", {"city": "Oslo"})]),
    (QWEN3_CODER, "<tool_call>\n<function=ping>\n<parameter=x>\n1\n</parameter>\n</tool_call>", "",
     [("ping", {"x": "1"})]),  # a missing </function> is forgiven; an unknown parameter stays a string
]


@pytest.mark.parametrize("syntax,text,content,calls", CASES, ids=[c[1][:30] for c in CASES])
def test_parser_output_does_not_depend_on_chunking(syntax, text, content, calls):
    ref_content, ref_calls, _ = run(syntax, text, [])
    assert ref_content == content
    assert [(name, json.loads(args)) for _, name, args in ref_calls] == calls
    assert len({i for i, _, _ in ref_calls}) == len(ref_calls)
    rnd = random.Random(0)
    for _ in range(200):
        cuts = sorted(rnd.sample(range(1, len(text)), min(len(text) - 1, rnd.randint(1, 30))))
        assert run(syntax, text, cuts)[:2] == (ref_content, ref_calls), cuts
    assert run(syntax, text, list(range(1, len(text))))[:2] == (ref_content, ref_calls)  # one character at a time


def test_deltas_stream_arguments_as_generated():
    text = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}\n</tool_call>'
    _, _, deltas = run(HERMES, text, list(range(1, len(text))))
    first, *rest = deltas
    assert (first.index, first.id, first.name, first.arguments) == (0, "call_0", "get_weather", "")
    assert len(rest) > 10 and all(d.id == "" and d.name == "" for d in rest)
    _, _, deltas = run(QWEN3_CODER, XML_TWO, list(range(1, len(XML_TWO))))
    city = [d.arguments for d in deltas if d.index == 0][1:6]
    assert city[0] == '{"city": "' and "".join(city[1:]).startswith("New")  # string values stream too


def test_unfinished_call_at_the_end():
    content, calls, _ = run(QWEN3_CODER, "<tool_call>\n<function=get_weather>\n<parameter=city>\nOs", [])
    assert content == "" and json.loads(calls[0][2]) == {"city": "Os"}
    content, calls, _ = run(HERMES, "almost <tool_call>\n{\"na", [])
    assert content == 'almost <tool_call>\n{"na' and not calls  # never became a call: given back as text
    assert run(HERMES, "text <tool_", [])[0] == "text <tool_"


def test_xml_values_follow_the_schema():
    assert xml_value("5", {"type": "integer"}) == 5 and xml_value("5", {"type": "string"}) == "5"
    assert xml_value("False", {"type": "boolean"}) is False and xml_value("x y", {}) == "x y"
    assert xml_value('{"a": 1}', {"type": "object"}) == {"a": 1} and xml_value("oops", {"type": "integer"}) == "oops"


def test_syntax_for_template():
    assert syntax_for_template("... '<tool_call>\\n<function=' + name ...") is QWEN3_CODER
    assert syntax_for_template('<tool_call>\\n{"name": <function-name>, "arguments": ...}') is HERMES
    assert syntax_for_template("{{ messages }}") is HERMES  # no tools in the template: our Hermes prompt


CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_templates_without_tools_get_them_as_text():
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather?"},
                {"role": "assistant", "content": "", "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "call_1", "content": "rain"},
                {"role": "tool", "tool_call_id": "call_2", "content": "wind"}]
    text = ChatTemplate(CHATML).render(messages, tools=TOOLS)
    assert text.startswith("<|im_start|>system\nBe brief.\n\n# Tools") and '"name": "get_weather"' in text
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>' in text
    assert "<|im_start|>user\n<tool_response>\nrain\n</tool_response>\n<tool_response>\nwind\n</tool_response>" in text
    native = polyfill_messages(messages, "{{ tools }} {{ m.tool_calls }} 'tool'", TOOLS)
    assert native[2]["tool_calls"][0]["function"]["arguments"] == {"city": "Oslo"}  # objects, as templates iterate
    assert native[3]["role"] == "tool" and len(native) == len(messages)


def test_tool_plan():
    template = ChatTemplate(CHATML)
    tools = json.dumps(TOOLS)
    assert ToolPlan.from_request(template, "", "required").parser() is None
    assert ToolPlan.from_request(template, tools, "none").tools is None
    auto = ToolPlan.from_request(template, tools, "")
    grammar, triggers = auto.grammar(thinking=True)
    assert triggers == ("<tool_call>",) and "</think>" not in grammar  # lazy: reasoning is not constrained
    forced = ToolPlan.from_request(template, tools, json.dumps("required"))  # LocalAI JSON-encodes ToolChoice
    grammar, triggers = forced.grammar(thinking=True)
    assert triggers == () and "</think>" in grammar
    assert parse_tool_choice('{"type": "function", "function": {"name": "f"}}') == {"name": "f"}
    for bad in ("sometimes", '{"type": "function"}'):
        with pytest.raises(InvalidRequestError):
            parse_tool_choice(bad)
    with pytest.raises(InvalidRequestError, match="Grammar"):
        ToolPlan.from_request(template, tools, "required", user_grammar='root ::= "x"')
    assert ToolPlan.from_request(template, tools, "auto", user_grammar='root ::= "x"').parser() is not None
