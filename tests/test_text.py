"""Pure text plumbing: UTF-8-safe, stop-safe streaming; reasoning split; tool-call extraction; options."""

from __future__ import annotations

import pytest

from backend.core.errors import InvalidOptionError, InvalidRequestError
from backend.engine.sampling import SamplingParams, parse_logit_bias
from backend.engine.textstream import ReasoningSplitter, TextStream
from backend.service.chat import ChatTemplate
from backend.service.options import parse_options


def feed_all(stream: TextStream, pieces: list[bytes]) -> list[str]:
    return [stream.feed(p) for p in pieces] + [stream.flush()]


def test_multibyte_characters_are_never_split():
    data = "héllo → 世界".encode()
    out = feed_all(TextStream(), [data[i:i + 1] for i in range(len(data))])
    assert "".join(out) == "héllo → 世界"
    assert all("\ufffd" not in o for o in out)


def test_stop_string_across_pieces_never_leaks():
    s = TextStream(("END",))
    out = feed_all(s, [b"abc E", b"N", b"D tail"])
    assert out[0] == "abc " and "".join(out) == "abc " and s.stopped == "END"


def test_partial_stop_prefix_released_when_it_does_not_complete():
    s = TextStream(("STOP",))
    assert s.feed(b"go ST") == "go "
    assert s.feed(b"ART") == "START"
    assert s.stopped is None


def test_reasoning_split_with_tags_across_chunks():
    sp = ReasoningSplitter(thinking=False)
    parts = [sp.feed(t) for t in ["Hi <thi", "nk>plan", " more</th", "ink> answer"]] + [sp.flush()]
    content = "".join(c for c, _ in parts)
    reasoning = "".join(r for _, r in parts)
    assert content == "Hi  answer" and reasoning == "plan more"


def test_reasoning_when_prompt_opened_think_block():
    sp = ReasoningSplitter(thinking=True)
    assert sp.feed("because</think>yes") == ("yes", "because")


def test_chat_template_renders_tools_and_kwargs():
    t = ChatTemplate("{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}"
                     "{% if tools %}T{{ tools|length }}{% endif %}{% if enable_thinking %}<think>{% endif %}")
    assert t.render([{"role": "user", "content": "x"}], tools=[{"a": 1}], enable_thinking=True) == "[user]xT1<think>"
    with pytest.raises(InvalidRequestError):
        ChatTemplate("{{ raise_exception('nope') }}").render([])


def test_options_parsing_strict_for_ours_lenient_for_others():
    assert parse_options(["spec_type:draft_mtp", "spec_n_max:4", "spec_p_min:0.75", "use_jinja", "gpu"]) == {
        "spec_type": ("draft-mtp",), "n_max": 4, "p_min": 0.75, "use_jinja": True}
    with pytest.raises(InvalidOptionError, match="did you mean"):
        parse_options(["spec_n_mn:1"])
    with pytest.raises(InvalidOptionError):
        parse_options(["spec_type:eagle9"])


def test_sampling_validation_and_logit_bias():
    with pytest.raises(InvalidRequestError, match="top_p"):
        SamplingParams(top_p=1.2)
    assert parse_logit_bias('{"5": -100, "7": false}', 10) == {5: -100.0, 7: float("-inf")}
    with pytest.raises(InvalidRequestError):
        parse_logit_bias('{"50": 1}', 10)
