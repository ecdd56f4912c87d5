"""Chat prompts from the GGUF's own Jinja template, and tool calls parsed out of the output."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from ..engine.textstream import THINK_OPEN
from ..errors import InvalidRequestError


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

    def render(
        self,
        messages: list[dict[str, Any]],
        *,
        tools: list[dict[str, Any]] | None = None,
        add_generation_prompt: bool = True,
        **kwargs: Any,
    ) -> str:
        """Render `messages` (OpenAI-style dicts) to the prompt text the model was trained on."""
        try:
            return _compile(self.source).render(
                messages=messages,
                tools=tools or None,
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


_TOOL_CALL = ("<tool_call>", "</tool_call>")


def extract_tool_calls(text: str) -> tuple[str, list[dict[str, Any]]]:
    """Pull Hermes/Qwen-style `<tool_call>{"name":..., "arguments":...}</tool_call>` blocks out of `text`.

    Returns the text without them and the calls as `{"name", "arguments" (JSON string)}`; blocks that are
    not valid JSON are left in the text.
    """
    calls: list[dict[str, Any]] = []
    kept: list[str] = []
    rest = text
    while True:
        start = rest.find(_TOOL_CALL[0])
        end = rest.find(_TOOL_CALL[1], start + 1) if start >= 0 else -1
        if start < 0 or end < 0:
            kept.append(rest)
            break
        body = rest[start + len(_TOOL_CALL[0]):end].strip()
        try:
            obj = json.loads(body)
            args = obj.get("arguments", {})
            calls.append({"name": str(obj["name"]), "arguments": args if isinstance(args, str) else json.dumps(args)})
            kept.append(rest[:start])
        except (json.JSONDecodeError, KeyError, AttributeError, TypeError):
            kept.append(rest[:end + len(_TOOL_CALL[1])])
        rest = rest[end + len(_TOOL_CALL[1]):]
    return "".join(kept).strip() if calls else text, calls
