"""Tool calls in model output: the syntaxes chat templates teach, and an incremental parser for them.

Two syntaxes cover the gallery and the demos, both wrapped in `<tool_call>...</tool_call>`:

* `hermes` (Qwen2.5/Qwen3, Hermes; also our prompt for templates that know no tools, such as SmolLM2's):
  `<tool_call>\\n{"name": NAME, "arguments": {...}}\\n</tool_call>`; a JSON array of such objects inside one block
  (how SmolLM2's function-calling data writes parallel calls) is read too.
* `qwen3_coder` (Qwen3-Coder, Qwen3.5/3.6): `<tool_call>\\n<function=NAME>\\n<parameter=K>\\nV\\n</parameter>\\n...
  </function>\\n</tool_call>`. Values are raw text; the tool's parameter schema says how to read them back as JSON
  (a string stays a string, `5` for an integer parameter becomes 5, Qwen3.5's Python-style `True` becomes true).

`ToolCallParser` is fed text as it is generated and returns what is content (markup never reaches it) and tool-call
deltas: the first delta of each call carries its index, a fresh id and the name; later ones carry fragments of its
JSON arguments as they are generated. Its output does not depend on how the text was cut into chunks, so a streamed
answer assembles to exactly the non-streamed one.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from ..engine.textstream import held_prefix

CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
FUNC_OPEN, FUNC_CLOSE = "<function=", "</function>"
PARAM_OPEN, PARAM_CLOSE = "<parameter=", "</parameter>"


@dataclass(frozen=True)
class ToolSyntax:
    """How a template's model writes a tool call. `triggers` open a call: they start the parser's call state and
    are the words a lazy grammar waits for."""

    name: str
    body: Literal["json", "xml"]
    markers: tuple[str, ...]  # text in a chat template that means it teaches this syntax
    triggers: tuple[str, ...]


HERMES = ToolSyntax("hermes", "json", markers=(CALL_OPEN,), triggers=(CALL_OPEN,))
QWEN3_CODER = ToolSyntax("qwen3_coder", "xml", markers=(FUNC_OPEN,), triggers=(CALL_OPEN, FUNC_OPEN))
SYNTAXES = (QWEN3_CODER, HERMES)  # most specific first: Qwen3-Coder templates mention <tool_call> too


def syntax_for_template(source: str) -> ToolSyntax:
    """The syntax a chat template teaches; Hermes for templates that teach none (we describe the tools ourselves)."""
    return next((s for s in SYNTAXES if any(m in source for m in s.markers)), HERMES)


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass
class CallDelta:
    """Part of one tool call: the first carries `id` and `name`, later ones `arguments` fragments."""

    index: int
    id: str = ""
    name: str = ""
    arguments: str = ""


@dataclass
class Parsed:
    """What one `feed` made visible: content text and tool-call deltas."""

    content: str = ""
    calls: list[CallDelta] = field(default_factory=list)

    def __iadd__(self, other: Parsed) -> Parsed:
        self.content += other.content
        self.calls += other.calls
        return self


def merge_calls(deltas: list[CallDelta]) -> list[CallDelta]:
    """Deltas -> one whole call per index, in index order (what a client assembles from a stream)."""
    calls: dict[int, CallDelta] = {}
    for d in deltas:
        call = calls.setdefault(d.index, CallDelta(d.index))
        call.id = call.id or d.id
        call.name = call.name or d.name
        call.arguments += d.arguments
    return [calls[i] for i in sorted(calls)]


def parameter_types(tools: list[dict[str, Any]] | None) -> dict[str, dict[str, Any]]:
    """Function name -> {parameter name: its JSON schema}, from OpenAI `tools`."""
    out: dict[str, dict[str, Any]] = {}
    for tool in tools or []:
        fn = tool.get("function", tool) if isinstance(tool, dict) else {}
        if isinstance(fn, dict) and isinstance(fn.get("name"), str):
            props = (fn.get("parameters") or {}).get("properties") or {}
            out[fn["name"]] = props if isinstance(props, dict) else {}
    return out


def _types(schema: Any) -> set[str]:
    t = schema.get("type") if isinstance(schema, dict) else None
    return {t} if isinstance(t, str) else set(t) if isinstance(t, list) else set()


def xml_value(text: str, schema: Any) -> Any:
    """A raw `<parameter>` value as the JSON value its schema asks for (a string when it says nothing else)."""
    types = _types(schema)
    if not types or types == {"string"}:
        return text
    stripped = text.strip()
    try:
        return json.loads(stripped)
    except json.JSONDecodeError:
        pass
    if "boolean" in types and stripped in ("True", "False"):  # Qwen3.5 renders scalars with Python's str()
        return stripped == "True"
    if "null" in types and stripped in ("None", ""):
        return None
    return text


class _JsonValueEnd:
    """Finds where a JSON value ends in text that arrives in pieces (strings and nesting tracked incrementally)."""

    def __init__(self) -> None:
        self.pos = 0
        self.depth = 0
        self.in_string = False
        self.escape = False
        self.started = False

    def scan(self, text: str) -> int | None:
        """Index just past the value in `text` (which only grows between calls), or None while it is incomplete."""
        while self.pos < len(text):
            c = text[self.pos]
            self.pos += 1
            if self.in_string:
                if self.escape:
                    self.escape = False
                elif c == "\\":
                    self.escape = True
                elif c == '"':
                    self.in_string = False
                    if self.depth == 0:
                        return self.pos
            elif c == '"':
                self.in_string, self.started = True, True
            elif c in "{[":
                self.depth, self.started = self.depth + 1, True
            elif c in "}]":
                self.depth -= 1
                if self.depth <= 0:
                    return self.pos
            elif self.depth == 0 and self.started and c in ",} \n\t":
                return self.pos - 1  # end of a bare number or literal
            elif not c.isspace():
                self.started = True
        return None


# The start of a Hermes call object whose name is known: the arguments value begins at the end of the match.
_HERMES_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"(?:arguments|parameters)"\s*:\s*'
                          r'(?=[\[{"0-9tfn-])')


class ToolCallParser:
    """Incremental tool-call parser for one generation (see the module docstring)."""

    def __init__(self, syntax: ToolSyntax, tools: list[dict[str, Any]] | None = None,
                 new_id: Callable[[], str] = new_call_id) -> None:
        self.syntax = syntax
        self._params = parameter_types(tools)
        self._new_id = new_id
        self._buf = ""  # text not consumed yet
        self._raw = ""  # the markup of the call being read, given back as content if it turns out malformed
        self._state = "content"
        self._index = -1  # index of the current call
        self._opened = False  # the current call has emitted its first delta
        self._after_call = False  # whitespace right after a call is dropped
        self.n_calls = 0
        # state of the call being read
        self._wrapped = False
        self._name = ""
        self._args_end: _JsonValueEnd | None = None
        self._args_string = False
        self._list = False
        self._n_params = 0
        self._param = ""
        self._param_schema: Any = None
        self._param_streamed = False
        self._pending_head = ""
        self._block_calls = 0  # calls started inside the current <tool_call> block

    # -- public -------------------------------------------------------------------------------------

    def feed(self, text: str) -> Parsed:
        """Consume newly generated text; return what became visible."""
        self._buf += text
        out = Parsed()
        while True:
            step = getattr(self, f"_{self._state}")(out)
            if not step:
                return out

    def finish(self) -> Parsed:
        """End of generation: text held back, or an unfinished call's markup when it never produced a delta."""
        out = self.feed("")
        if self._state == "content":
            out.content += self._buf.lstrip() if self._after_call else self._buf
        elif self._opened and self._state.startswith("xml_") and self._state != "xml_tail":
            if self._state == "xml_value":
                out.calls.append(CallDelta(self._index, arguments=self._value_end(self._buf)))
            out.calls.append(CallDelta(self._index, arguments=self._closing_arguments()))
        elif not self._block_calls:
            out.content += self._raw + self._buf
        self._buf, self._raw, self._state = "", "", "content"
        return out

    # -- states: each returns True when it consumed something and the loop should go on ---------------

    def _content(self, out: Parsed) -> bool:
        found = [(i, w) for w in self.syntax.triggers if (i := self._buf.find(w)) >= 0]
        if found:
            i, word = min(found)
            dropped = self._show(out, self._buf[:i])
            self._buf = self._buf[i + len(word):]
            self._raw = dropped + word  # given back if the block turns out not to be a call
            self._begin_call(word)
            return True
        keep = held_prefix(self._buf, self.syntax.triggers)
        self._buf = self._show(out, self._buf[:len(self._buf) - keep]) + self._buf[len(self._buf) - keep:]
        return False

    def _show(self, out: Parsed, text: str) -> str:
        """Emit `text` as content except the whitespace that may touch a call, which is returned (held back)."""
        lead = len(text) - len(text.lstrip()) if self._after_call else 0
        end = len(text.rstrip())
        if end <= lead:
            return text
        out.content += text[lead:end]
        self._after_call = False
        return text[end:]

    def _begin_call(self, word: str) -> None:
        self._index = self.n_calls
        self._opened = False
        self._wrapped = word == CALL_OPEN
        self._list = False
        self._block_calls = 0
        self._state = "call_body" if self._wrapped else "xml_name"

    def _call_body(self, out: Parsed) -> bool:
        body = self._buf.lstrip()
        if not body:
            return False
        if body[0] in "{[":
            self._list = body[0] == "["
            self._consume(len(self._buf) - len(body) + (1 if self._list else 0))
            self._state = "json_head"
            return True
        if body.startswith(FUNC_OPEN):
            self._consume(len(self._buf) - len(body) + len(FUNC_OPEN))
            self._state = "xml_name"
            return True
        if FUNC_OPEN.startswith(body):
            return False
        self._state = "malformed"
        return True

    def _consume(self, n: int) -> str:
        taken, self._buf = self._buf[:n], self._buf[n:]
        self._raw += taken
        return taken

    def _start(self, out: Parsed, name: str) -> None:
        self._name = name
        self._opened = True
        self._block_calls += 1
        self.n_calls += 1
        out.calls.append(CallDelta(self._index, id=self._new_id(), name=name))

    # Hermes JSON ------------------------------------------------------------------------------------

    def _json_head(self, out: Parsed) -> bool:
        m = _HERMES_HEAD.match(self._buf)
        if m:
            self._start(out, json.loads(f'"{m.group(1)}"'))
            self._consume(m.end())
            self._args_end = _JsonValueEnd()
            self._args_string = self._buf[:1] == '"'
            self._state = "json_args"
            return True
        # Not the usual name-first head: read the whole object, then take it apart.
        scan = _JsonValueEnd()
        end = scan.scan(self._buf)
        if end is None:
            return self._closer_arrived()
        try:
            obj = json.loads(self._buf[:end])
            name, args = str(obj["name"]), obj.get("arguments", obj.get("parameters", {}))
        except (json.JSONDecodeError, KeyError, TypeError):
            self._state = "malformed"
            return True
        self._consume(end)
        self._start(out, name)
        out.calls.append(CallDelta(self._index, arguments=args if isinstance(args, str) else json.dumps(args)))
        self._state = "json_tail"
        return True

    def _json_args(self, out: Parsed) -> bool:
        assert self._args_end is not None
        end = self._args_end.scan(self._buf)
        if self._args_string:  # arguments sent as a JSON string: decoded once complete
            if end is None:
                return False
            raw = self._consume(end)
            out.calls.append(CallDelta(self._index, arguments=str(json.loads(raw))))
        else:
            piece = self._consume(end if end is not None else len(self._buf))
            self._args_end.pos -= len(piece)
            if piece:
                out.calls.append(CallDelta(self._index, arguments=piece))
            if end is None:
                return False
        self._state = "json_tail"
        return True

    def _json_tail(self, out: Parsed) -> bool:
        """After the arguments: the call object's `}`, then `,` (next object in a list), `]` or `</tool_call>`."""
        rest = self._buf.lstrip()
        if not rest:
            return False
        if rest[0] in "}]" or (rest[0] == "," and self._list):
            self._consume(len(self._buf) - len(rest) + 1)
            if rest[0] == ",":
                self._index = self.n_calls
                self._opened = False
                self._state = "json_head"
            return True
        return self._close_call(out)

    # Qwen3-Coder XML ---------------------------------------------------------------------------------

    def _xml_name(self, out: Parsed) -> bool:
        end = self._buf.find(">")
        if end < 0:
            return self._closer_arrived()
        name = self._buf[:end].strip()
        self._consume(end + 1)
        self._start(out, name)
        self._n_params = 0
        self._state = "xml_params"
        return True

    def _xml_params(self, out: Parsed) -> bool:
        rest = self._buf.lstrip()
        if rest.startswith(PARAM_OPEN):
            end = rest.find(">")
            if end < 0:
                return False
            self._param = rest[len(PARAM_OPEN):end].strip()
            self._consume(len(self._buf) - len(rest) + end + 1)
            self._param_schema = self._params.get(self._name, {}).get(self._param)
            self._param_streamed = _types(self._param_schema) in (set(), {"string"})
            self._state = "xml_value_start"
            return True
        if rest.startswith((FUNC_CLOSE, CALL_CLOSE)):  # a missing </function> is forgiven
            if rest.startswith(FUNC_CLOSE):
                self._consume(len(self._buf) - len(rest) + len(FUNC_CLOSE))
            out.calls.append(CallDelta(self._index, arguments=self._closing_arguments()))
            self._state = "xml_tail" if self._wrapped else "content"
            self._after_call = not self._wrapped
            return True
        if not rest or any(w.startswith(rest) for w in (PARAM_OPEN, FUNC_CLOSE, CALL_CLOSE)):
            return False
        nxt = rest.find("<", 1)  # stray text between parameters is skipped
        self._consume(len(self._buf) - len(rest) + (nxt if nxt > 0 else len(rest)))
        return nxt > 0

    def _closing_arguments(self) -> str:
        return "{}" if self._n_params == 0 else "}"

    def _xml_value_start(self, out: Parsed) -> bool:
        if not self._buf:
            return False
        if self._buf[0] == "\n":
            self._consume(1)
        key = json.dumps(self._param, ensure_ascii=False)
        head = ("{" if self._n_params == 0 else ", ") + key + ": "
        self._n_params += 1
        if self._param_streamed:
            out.calls.append(CallDelta(self._index, arguments=head + '"'))
        else:
            self._pending_head = head
        self._state = "xml_value"
        return True

    def _xml_value(self, out: Parsed) -> bool:
        end = self._buf.find(PARAM_CLOSE)
        if end < 0:
            if not self._param_streamed:
                return False
            keep = held_prefix(self._buf, ("\n" + PARAM_CLOSE, PARAM_CLOSE))
            if self._buf.endswith("\n"):
                keep = max(keep, 1)
            piece = self._consume(len(self._buf) - keep)
            if piece:
                out.calls.append(CallDelta(self._index, arguments=json.dumps(piece, ensure_ascii=False)[1:-1]))
            return False
        value = self._consume(end)
        self._consume(len(PARAM_CLOSE))
        out.calls.append(CallDelta(self._index, arguments=self._value_end(value.removesuffix("\n"))))
        self._state = "xml_params"
        return True

    def _value_end(self, value: str) -> str:
        """The rest of a parameter's JSON once its raw value is complete."""
        if self._param_streamed:
            return json.dumps(value, ensure_ascii=False)[1:-1] + '"'
        return self._pending_head + json.dumps(xml_value(value, self._param_schema), ensure_ascii=False)

    def _xml_tail(self, out: Parsed) -> bool:
        rest = self._buf.lstrip()
        if rest.startswith(FUNC_OPEN):  # another function inside the same <tool_call> block
            self._consume(len(self._buf) - len(rest) + len(FUNC_OPEN))
            self._index = self.n_calls
            self._state = "xml_name"
            return True
        if rest and FUNC_OPEN.startswith(rest):
            return False
        return self._close_call(out)

    # endings -------------------------------------------------------------------------------------------

    def _close_call(self, out: Parsed) -> bool:
        """Wait for `</tool_call>`; whatever stands before it inside the block is dropped."""
        end = self._buf.find(CALL_CLOSE)
        if end < 0:
            return False
        self._buf = self._buf[end + len(CALL_CLOSE):]
        self._raw = ""
        self._state = "content"
        self._after_call = True
        return True

    def _closer_arrived(self) -> bool:
        """A call that has not started yet but whose block already closed is malformed."""
        if CALL_CLOSE in self._buf:
            self._state = "malformed"
            return True
        return False

    def _malformed(self, out: Parsed) -> bool:
        """Not a call after all: give the block back as content once it is closed (or at the end); a block that
        already produced a call just ends."""
        if self._block_calls:
            return self._close_call(out)
        end = self._buf.find(CALL_CLOSE)
        if end < 0:
            return False
        end += len(CALL_CLOSE)
        out.content += self._raw + self._buf[:end]
        self._buf = self._buf[end:]
        self._raw = ""
        self._state = "content"
        return True


def parse_tool_calls(text: str, syntax: ToolSyntax, tools: list[dict[str, Any]] | None = None
                     ) -> tuple[str, list[CallDelta]]:
    """Whole text -> (content without call markup, whole calls)."""
    parser = ToolCallParser(syntax, tools)
    out = parser.feed(text)
    out += parser.finish()
    return out.content, merge_calls(out.calls)
