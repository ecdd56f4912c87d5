"""Chat prompts from the GGUF's own Jinja template, and what a request's tools do to prompt, grammar and output.

Templates that know nothing of tools (SmolLM2's, plain ChatML) get them anyway, the way llama.cpp polyfills them:
the tools are described in a system message in the Hermes syntax, earlier assistant calls are written back as
`<tool_call>` blocks and tool results as `<tool_response>` user turns. `ToolPlan` decides, per request, what the
template shows, which grammar forces or (lazily) constrains the calls, and which parser reads them back.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from ..core.errors import InvalidRequestError
from ..engine.textstream import THINK_OPEN
from .grammars import tool_call_grammar, tool_function, trigger_patterns
from .tools import CALL_CLOSE, CALL_OPEN, ToolCallParser, ToolSyntax, syntax_for_template


def _raise(message: str) -> None:
    raise InvalidRequestError(f"chat template: {message}")


@lru_cache(maxsize=8)
def _compile(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.filters["tojson"] = lambda v, indent=None, ensure_ascii=False, **_: json.dumps(v, indent=indent, ensure_ascii=ensure_ascii)
    return env.from_string(source)


@dataclass(frozen=True)
class ChatTemplate:
    """A GGUF chat template plus the special-token strings it refers to."""

    source: str
    bos_token: str = ""
    eos_token: str = ""

    @property
    def supports_thinking(self) -> bool:
        return THINK_OPEN in self.source or "enable_thinking" in self.source

    @property
    def tool_syntax(self) -> ToolSyntax:
        return syntax_for_template(self.source)

    @property
    def renders_tools(self) -> bool:
        return "tools" in self.source

    def render(
        self,
        messages: list[dict[str, Any]],
        *,
        tools: list[dict[str, Any]] | None = None,
        add_generation_prompt: bool = True,
        **kwargs: Any,
    ) -> str:
        """Render `messages` (OpenAI-style dicts) to the prompt text the model was trained on."""
        messages = polyfill_messages(messages, self.source, tools)
        try:
            return _compile(self.source).render(
                messages=messages,
                tools=(tools or None) if self.renders_tools else None,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
                **kwargs,
            )
        except InvalidRequestError:
            raise
        except jinja2.TemplateError as exc:
            raise InvalidRequestError(f"chat template failed to render: {exc}") from None


def message_dicts(messages: Any) -> list[dict[str, Any]]:
    """proto `Message`s -> template dicts; `tool_calls` JSON is decoded, empty fields are left out."""
    out = []
    for m in messages:
        d: dict[str, Any] = {"role": m.role, "content": m.content}
        for name in ("name", "tool_call_id", "reasoning_content"):
            if getattr(m, name):
                d[name] = getattr(m, name)
        if m.tool_calls:
            try:
                d["tool_calls"] = json.loads(m.tool_calls)
            except json.JSONDecodeError:
                raise InvalidRequestError(f"message tool_calls is not valid JSON: {m.tool_calls[:80]!r}") from None
        out.append(d)
    return out


_TOOLS_PROMPT = (
    "# Tools\n\nYou may call one or more functions to help with the user's request. The functions, as JSON:\n"
    "<tools>\n{tools}\n</tools>\n\nTo call functions, reply with one block per call and nothing after them:\n"
    + CALL_OPEN + '\n{{"name": <function name>, "arguments": <arguments as a JSON object>}}\n' + CALL_CLOSE
)


def _call_block(call: dict[str, Any]) -> str:
    fn = call.get("function", call)
    return f"{CALL_OPEN}\n{json.dumps({'name': fn.get('name'), 'arguments': fn.get('arguments')})}\n{CALL_CLOSE}"


def polyfill_messages(messages: list[dict[str, Any]], source: str,
                      tools: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    """Messages as `source` can render them: call arguments as objects (templates iterate over them), and for
    templates without tool support the tools, earlier calls and tool results written out as text."""
    out: list[dict[str, Any]] = []
    merged_into = -1  # index of the user turn that collects consecutive tool results
    for m in messages:
        m = dict(m)
        if m.get("tool_calls"):
            m["tool_calls"] = [_object_arguments(c) for c in m["tool_calls"]]
            if "tool_calls" not in source:
                blocks = "\n".join(_call_block(c) for c in m.pop("tool_calls"))
                m["content"] = f"{m.get('content') or ''}\n{blocks}".lstrip("\n")
        if m.get("role") == "tool" and "'tool'" not in source and '"tool"' not in source:
            text = f"<tool_response>\n{m.get('content') or ''}\n</tool_response>"
            if merged_into == len(out) - 1 >= 0:
                out[-1]["content"] += "\n" + text
                continue
            m = {"role": "user", "content": text}
            merged_into = len(out)
        out.append(m)
    if tools and "tools" not in source:
        text = _TOOLS_PROMPT.format(tools="\n".join(json.dumps(t, ensure_ascii=False) for t in tools))
        if out and out[0].get("role") == "system":
            out[0] = {**out[0], "content": f"{out[0].get('content') or ''}\n\n{text}".lstrip()}
        else:
            out.insert(0, {"role": "system", "content": text})
    return out


def _object_arguments(call: Any) -> Any:
    """An OpenAI tool call with its `arguments` JSON string decoded (left as is when it is not JSON)."""
    if not isinstance(call, dict):
        return call
    fn = call.get("function")
    if isinstance(fn, dict) and isinstance(fn.get("arguments"), str):
        try:
            return {**call, "function": {**fn, "arguments": json.loads(fn["arguments"] or "{}")}}
        except json.JSONDecodeError:
            return call
    return call


def _decode(text: str, field: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidRequestError(f"{field} is not valid JSON: {exc}", param=field) from None


def parse_tool_choice(raw: str) -> str | dict[str, Any]:
    """LocalAI's ToolChoice: "auto"/"none"/"required", or a function choice, JSON-encoded or not ("" = auto)."""
    if not raw:
        return "auto"
    try:
        choice = json.loads(raw)
    except json.JSONDecodeError:
        choice = raw
    if isinstance(choice, str) and choice in ("auto", "none", "required"):
        return choice
    if isinstance(choice, dict):
        fn = choice.get("function")
        name = fn.get("name") if isinstance(fn, dict) else choice.get("name")
        if isinstance(name, str) and name:
            return {"name": name}
    raise InvalidRequestError(f"tool_choice must be auto, none, required or {{\"type\": \"function\", "
                              f"\"function\": {{\"name\": ...}}}}, not {raw[:80]!r}", param="ToolChoice")


@dataclass(frozen=True)
class ToolPlan:
    """What a request's tools do: the tools the template shows, and how calls are constrained and read back.

    `choice`: "auto" (a lazy grammar that waits for the syntax's call marker), "required" or {"name": ...}
    (grammar-forced from the first token), "none" (no tools at all). A request's own Grammar takes the place of
    the tool grammar under "auto" (LocalAI sends one when its function grammar is on); with a forced choice the
    two would contradict each other and are refused.
    """

    tools: list[dict[str, Any]] | None = None
    syntax: ToolSyntax | None = None
    choice: str | dict[str, Any] = "auto"
    parallel: bool = True

    @classmethod
    def from_request(cls, template: ChatTemplate | None, tools_json: str, tool_choice: str, *,
                     parallel: bool = True, user_grammar: str = "") -> ToolPlan:
        """The plan for a request's Tools and ToolChoice (JSON, as LocalAI sends them), checked: errors name the
        field (`Tools[2]`, `ToolChoice`). A ToolChoice without Tools has no effect: LocalAI may send one."""
        choice = parse_tool_choice(tool_choice)
        if not tools_json:
            return cls()
        tools = _decode(tools_json, "Tools")
        if not isinstance(tools, list):
            raise InvalidRequestError("tools must be an array", param="Tools")
        names = [tool_function(tool, i)["name"] for i, tool in enumerate(tools)]
        if isinstance(choice, dict) and choice["name"] not in names:
            raise InvalidRequestError(f"tool_choice names function {choice['name']!r}, which is not among the tools",
                                      param="ToolChoice")
        if choice == "none" or not tools:
            return cls(choice="none")
        if choice != "auto" and user_grammar:
            raise InvalidRequestError("a Grammar (or response_format) cannot be combined with tool_choice required or "
                                      "a named function: that forces the tool-call grammar", param="ToolChoice")
        syntax = template.tool_syntax if template is not None else syntax_for_template("")
        return cls(tools=tools, syntax=syntax, choice=choice, parallel=parallel)

    def grammar(self, *, thinking: bool) -> tuple[str, tuple[str, ...]]:
        """(GBNF, lazy trigger patterns) for the calls; ("", ()) when nothing constrains them."""
        if self.tools is None or self.syntax is None:
            return "", ()
        name = self.choice.get("name") if isinstance(self.choice, dict) else None
        forced = self.choice != "auto"
        try:
            grammar = tool_call_grammar(self.syntax, self.tools, name=name, parallel=self.parallel,
                                        thinking=thinking and forced)
        except InvalidRequestError as exc:  # a parameters schema the grammar cannot enforce
            exc.param = exc.param or "Tools"
            raise
        return grammar, () if forced else tuple(trigger_patterns(self.syntax.triggers))

    def parser(self) -> ToolCallParser | None:
        return ToolCallParser(self.syntax, self.tools) if self.tools is not None and self.syntax else None
