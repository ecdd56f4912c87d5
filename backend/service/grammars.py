"""GBNF grammars for structured output and tool calls (pure functions; llama.cpp parses the text they return).

* `response_format_grammar`: OpenAI `response_format` (`json_object`, `json_schema` with or without `strict`) -> GBNF.
* `schema_grammar`: a JSON Schema -> GBNF, following the rules of llama.cpp's own converter
  (`common/json-schema-to-grammar.cpp`, what llama-server uses): `additionalProperties` is false unless given,
  properties come in schema order with the required ones first, `oneOf` is read as `anyOf`. It is a Python
  re-implementation because llama-cpp-python does not ship llama.cpp's `common` library, and the port it does ship
  (`llama_cpp.llama_grammar.json_schema_to_gbnf`) is an older one that enforces less and mis-escapes some literals
  (see the comparison in `tests/test_grammars.py`). Every keyword that narrows what is valid and that the grammar
  cannot enforce is refused with `InvalidRequestError` naming it: a schema is never silently loosened.
* `tool_call_grammar`: the calls of `tool_choice` "required", a named function or "auto" (lazy: the grammar waits
  for the syntax's trigger words, `trigger_patterns`) in the template's tool-call syntax, each call's arguments
  constrained by the tool's parameter schema.
"""

from __future__ import annotations

import json
import re
from typing import Any, ClassVar

from ..core.errors import InvalidRequestError
from .tools import CALL_CLOSE, CALL_OPEN, FUNC_CLOSE, FUNC_OPEN, PARAM_CLOSE, PARAM_OPEN, ToolSyntax

SPACE = '| " " | "\\n"{1,2} [ \\t]{0,20}'  # bounded, so a model cannot loop on whitespace
_CHAR = '[^"\\\\\\x7F\\x00-\\x1F] | [\\\\] (["\\\\/bfnrt] | "u" [0-9a-fA-F]{4})'
_PRIMITIVES: dict[str, tuple[str, tuple[str, ...]]] = {
    "space": (SPACE, ()),
    "char": (_CHAR, ()),
    "boolean": ('("true" | "false") space', ("space",)),
    "null": ('"null" space', ("space",)),
    "integral-part": ('[0] | [1-9] [0-9]{0,15}', ()),
    "decimal-part": ('[0-9]{1,16}', ()),
    "integer": ('("-"? integral-part) space', ("integral-part", "space")),
    "number": ('("-"? integral-part) ("." decimal-part)? ([eE] [-+]? integral-part)? space',
               ("integral-part", "decimal-part", "space")),
    "string": ('"\\"" char* "\\"" space', ("char", "space")),
    "value": ("object | array | string | number | boolean | null",
              ("object", "array", "string", "number", "boolean", "null")),
    "object": ('"{" space ( string ":" space value ("," space string ":" space value)* )? "}" space',
               ("string", "value", "space")),
    "array": ('"[" space ( value ("," space value)* )? "]" space', ("value", "space")),
    "date": ('[0-9]{4} "-" ( "0" [1-9] | "1" [0-2] ) "-" ( "0" [1-9] | [1-2] [0-9] | "3" [0-1] )', ()),
    "time": (('([01] [0-9] | "2" [0-3]) ":" [0-5] [0-9] ":" [0-5] [0-9] ( "." [0-9]{3} )? '
              '( "Z" | ( "+" | "-" ) ( [01] [0-9] | "2" [0-3] ) ":" [0-5] [0-9] )'), ()),
    "date-time": ('date "T" time', ("date", "time")),
    "uuid": ('[0-9a-fA-F]{8} "-" [0-9a-fA-F]{4} "-" [0-9a-fA-F]{4} "-" [0-9a-fA-F]{4} "-" [0-9a-fA-F]{12}', ()),
}
_FORMATS = ("date", "time", "date-time", "uuid")
_TYPES = ("string", "number", "integer", "boolean", "null", "object", "array")
# Keywords that only describe or widen: ignoring them never lets an invalid answer through.
_ANNOTATIONS = frozenset({"title", "description", "default", "examples", "example", "$schema", "$id", "$comment",
                          "deprecated", "readOnly", "writeOnly", "nullable", "discriminator", "$defs", "definitions",
                          "strict", "contentMediaType", "contentEncoding", "name"})
_SUPPORTED = frozenset({"type", "enum", "const", "anyOf", "oneOf", "allOf", "$ref", "properties", "required",
                        "additionalProperties", "items", "prefixItems", "minItems", "maxItems", "minLength",
                        "maxLength", "pattern", "format", "minimum", "maximum", "exclusiveMinimum",
                        "exclusiveMaximum"})
_QUOTED = re.compile(r'"(?:[^"\\]|\\.)*"|\[(?:[^\]\\]|\\.)*\]')  # literals and classes hold no rule names
_NAME = re.compile(r"[a-zA-Z][a-zA-Z0-9-]*")
MAX_REPEAT = 1000  # llama.cpp refuses grammars whose repetitions expand too far; refuse them here, by name


def _fail(path: str, message: str) -> InvalidRequestError:
    return InvalidRequestError(f"JSON schema at {path or '#'}: {message}")


def literal(text: str) -> str:
    """A GBNF string literal matching `text` exactly."""
    out = []
    for c in text:
        if c in '"\\':
            out.append("\\" + c)
        elif c == "\n":
            out.append("\\n")
        elif c == "\r":
            out.append("\\r")
        elif c == "\t":
            out.append("\\t")
        elif ord(c) < 0x20 or ord(c) == 0x7F:
            out.append(f"\\x{ord(c):02X}")
        else:
            out.append(c)
    return '"' + "".join(out) + '"'


def _repeat(item: str, lo: int, hi: int | None, sep: str = "") -> str:
    """`item` lo..hi times (hi None: unbounded), separated by `sep`."""
    if hi == 0:
        return ""
    if not sep:
        return f"({item})" + ("?" if (lo, hi) == (0, 1) else "*" if (lo, hi) == (0, None) else
                              "+" if (lo, hi) == (1, None) else f"{{{lo},{'' if hi is None else hi}}}")
    rest = _repeat(f"{sep} {item}", max(lo - 1, 0), None if hi is None else hi - 1)
    first = f"{item} {rest}" if rest else item
    return first if lo > 0 else f"({first})?"


# ----------------------------------------------------------------------------------------- integer ranges


def _digit_ranges(lo: str, hi: str) -> list[str]:
    """GBNF sequences matching every decimal in [lo, hi], both of the same length, as written (no sign)."""
    if lo == hi:
        return [literal(lo)]
    if len(lo) == 1:
        return [f"[{lo}-{hi}]"]
    if lo[0] == hi[0]:
        return [f"{literal(lo[0])} ({' | '.join(_digit_ranges(lo[1:], hi[1:]))})"]
    n = len(lo) - 1
    out: list[str] = []
    a, b = int(lo[0]), int(hi[0])
    if lo[1:] != "0" * n:
        out.append(f"{literal(lo[0])} ({' | '.join(_digit_ranges(lo[1:], '9' * n))})")
        a += 1
    tail_full = hi[1:] == "9" * n
    top = b if tail_full else b - 1
    if a <= top:
        out.append(f"[{a}-{top}] [0-9]{{{n}}}" if a < top else f"{literal(str(a))} [0-9]{{{n}}}")
    if not tail_full:
        out.append(f"{literal(hi[0])} ({' | '.join(_digit_ranges('0' * n, hi[1:]))})")
    return out


def _natural_range(lo: int, hi: int | None) -> str:
    """Non-negative integers in [lo, hi] (hi None: unbounded), without leading zeros."""
    alts: list[str] = []
    top = hi if hi is not None else 10 ** len(str(lo)) - 1
    for width in range(len(str(lo)), len(str(top)) + 1):
        a = max(lo, 10 ** (width - 1) if width > 1 else 0)
        b = min(top, 10**width - 1)
        if a <= b:
            alts += _digit_ranges(str(a).zfill(width), str(b))
    if hi is None:
        alts.append(f"[1-9] [0-9]{{{len(str(lo))},15}}")
    return " | ".join(f"({a})" for a in alts)


def _integer_range(lo: int | None, hi: int | None) -> str:
    if lo is not None and hi is not None and lo > hi:
        raise ValueError(f"minimum {lo} is greater than maximum {hi}")
    alts = []
    if lo is None or lo < 0:  # negative part: "-" then magnitudes in [max(1, -hi), -lo]
        mag_lo = 1 if hi is None or hi >= 0 else -hi
        alts.append(f'"-" ({_natural_range(mag_lo, None if lo is None else -lo)})')
    if hi is None or hi >= 0:
        alts.append(_natural_range(max(lo or 0, 0), hi))
    return " | ".join(f"({a})" for a in alts)


# ----------------------------------------------------------------------------------------- regex patterns


class _Pattern:
    """A JSON Schema `pattern` (ECMA regex subset) -> GBNF over the characters of a JSON string's content."""

    # \s is a space only: a JSON string holds tabs and newlines escaped
    _CLASSES: ClassVar[dict[str, str]] = {"d": "[0-9]", "w": "[a-zA-Z0-9_]", "s": "[ ]", "D": "[^0-9\"\\\\\\x00-\\x1F\\x7F]",
                "W": "[^a-zA-Z0-9_\"\\\\\\x00-\\x1F\\x7F]", "S": "[^ \\t\"\\\\\\x00-\\x1F\\x7F]"}

    def __init__(self, pattern: str, path: str) -> None:
        self.src, self.i, self.path = pattern, 0, path

    def fail(self, why: str) -> InvalidRequestError:
        return _fail(self.path, f"pattern {self.src!r} is not supported ({why})")

    def convert(self) -> str:
        src = self.src
        start, end = src.startswith("^"), src.endswith("$") and not src.endswith("\\$")
        self.src = src[1 if start else 0:len(src) - 1 if end else len(src)]
        body = self.alternation()
        if self.i != len(self.src):
            raise self.fail(f"unexpected {self.src[self.i]!r}")
        # An unanchored pattern may match anywhere in the string (JSON Schema uses search semantics).
        return f"{'' if start else 'char* '}({body}){'' if end else ' char*'}"

    def alternation(self) -> str:
        alts = [self.sequence()]
        while self.i < len(self.src) and self.src[self.i] == "|":
            self.i += 1
            alts.append(self.sequence())
        return " | ".join(f"({a})" if a else '""' for a in alts)

    def sequence(self) -> str:
        items: list[str] = []
        while self.i < len(self.src) and self.src[self.i] not in "|)":
            atom = self.atom()
            items.append(self.quantified(atom))
        return " ".join(items)

    def atom(self) -> str:
        c = self.src[self.i]
        self.i += 1
        if c == "(":
            if self.src.startswith("?:", self.i):
                self.i += 2
            elif self.src.startswith("?", self.i):
                raise self.fail("lookaround and named groups")
            inner = self.alternation()
            if self.i >= len(self.src) or self.src[self.i] != ")":
                raise self.fail("unbalanced parenthesis")
            self.i += 1
            return f"({inner})"
        if c == "[":
            return self.char_class()
        if c == ".":
            return "char"
        if c == "\\":
            return self.escape(in_class=False)
        if c in "^$":
            raise self.fail("anchor inside the pattern")
        if c in "*+?{":
            raise self.fail(f"nothing to repeat before {c!r}")
        return literal(json.dumps(c, ensure_ascii=False)[1:-1])

    def escape(self, *, in_class: bool) -> str:
        if self.i >= len(self.src):
            raise self.fail("trailing backslash")
        c = self.src[self.i]
        self.i += 1
        if c in self._CLASSES:
            if in_class and c in "DWS":
                raise self.fail(f"\\{c} inside a character class")
            return self._CLASSES[c][1:-1] if in_class else self._CLASSES[c]
        if c in "nrtfv":
            raise self.fail(f"\\{c} (control characters in a JSON string)")
        if c.isalnum():
            raise self.fail(f"escape \\{c}")
        return c if in_class else literal(json.dumps(c, ensure_ascii=False)[1:-1])

    def char_class(self) -> str:
        negate = self.src.startswith("^", self.i)
        self.i += negate
        parts: list[str] = []
        escaped: list[str] = []  # '"' and '\\' must appear escaped in the JSON text
        first = True
        while self.i < len(self.src) and (self.src[self.i] != "]" or first):
            first = False
            c = self.src[self.i]
            self.i += 1
            if c == "\\":
                part = self.escape(in_class=True)
                if len(part) == 1:
                    c = part
                else:
                    parts.append(part)
                    continue
            if self.src.startswith("-", self.i) and self.i + 1 < len(self.src) and self.src[self.i + 1] != "]":
                hi = self.src[self.i + 1]
                self.i += 2
                if hi == "\\":
                    raise self.fail("escaped range end")
                parts.append(f"{_class_char(c)}-{_class_char(hi)}")
            elif c in '"\\' and not negate:
                escaped.append(literal("\\" + c))
            else:
                parts.append(_class_char(c))
        if self.i >= len(self.src):
            raise self.fail("unterminated character class")
        self.i += 1
        if negate:  # never a quote, backslash or control character: the JSON string stays valid
            return f"[^{''.join(parts)}\"\\\\\\x00-\\x1F\\x7F]"
        alts = ([f"[{''.join(parts)}]"] if parts else []) + escaped
        return f"({' | '.join(alts)})" if alts else '""'

    def quantified(self, atom: str) -> str:
        if self.i >= len(self.src):
            return atom
        c = self.src[self.i]
        lo: int
        hi: int | None
        if c in "*+?":
            self.i += 1
            lo, hi = {"*": (0, None), "+": (1, None), "?": (0, 1)}[c]
        elif c == "{":
            m = re.compile(r"\{(\d+)(,(\d*))?\}").match(self.src, self.i)
            if not m:
                raise self.fail("malformed {m,n}")
            self.i = m.end()
            lo = int(m.group(1))
            hi = lo if m.group(2) is None else (int(m.group(3)) if m.group(3) else None)
            if max(lo, hi or 0) > MAX_REPEAT:
                raise self.fail(f"repetition over {MAX_REPEAT}")
        else:
            return atom
        if self.src.startswith("?", self.i):  # lazy quantifiers match the same strings
            self.i += 1
        return _repeat(atom, lo, hi)


def _class_char(c: str) -> str:
    # GBNF knows the escapes \\ \[ \] (and \xHH): '-' and '^' are written as hex
    return {"]": "\\]", "[": "\\[", "\\": "\\\\", "^": "\\x5E", "-": "\\x2D"}.get(c, c)


# ----------------------------------------------------------------------------------------- the converter


class GrammarBuilder:
    """Collects GBNF rules; `schema(...)` adds the rules of a JSON schema and returns the rule that matches it."""

    def __init__(self, root_doc: Any = None) -> None:
        self.rules: dict[str, str] = {}
        self._doc = root_doc
        self._refs: dict[str, str] = {}  # $ref -> rule name (a recursive schema refers to its own rule)

    def add(self, name: str, body: str) -> str:
        """Add rule `name` (renamed with a number when another body holds the name); returns its name."""
        key = re.sub(r"[^a-zA-Z0-9-]+", "-", name) or "rule"
        candidate, n = key, 0
        while candidate in self.rules and self.rules[candidate] != body:
            n += 1
            candidate = f"{key}{n}"
        self.rules[candidate] = body
        return candidate

    def primitive(self, name: str) -> str:
        body, deps = _PRIMITIVES[name]
        if name not in self.rules:
            self.rules[name] = body
            for dep in deps:
                self.primitive(dep)
        return name

    def format(self, root: str) -> str:
        """The grammar text: the rules reachable from `root`, root first."""
        seen, todo = [], [root]
        while todo:
            name = todo.pop()
            if name in seen:
                continue
            seen.append(name)
            bare = _QUOTED.sub(" ", self.rules[name])
            todo += [n for n in _NAME.findall(bare) if n in self.rules]
        return "".join(f"{k} ::= {self.rules[k]}\n" for k in seen)

    # -- schema -> rules ---------------------------------------------------------------------------------

    def schema(self, schema: Any, name: str, path: str = "#") -> str:
        if schema is True or schema == {}:
            return self.primitive("value")
        if not isinstance(schema, dict):
            raise _fail(path, "a schema must be an object or true")
        for key in schema:
            if key not in _SUPPORTED and key not in _ANNOTATIONS:
                raise _fail(path, f"keyword {key!r} is not supported (the answer could not be held to it)")
        if "$ref" in schema:
            beside = sorted(set(schema) - {"$ref"} - _ANNOTATIONS)
            if beside:
                raise _fail(path, f"keywords beside $ref are not supported: {', '.join(beside)}")
            return self._ref(schema["$ref"], path)
        if "allOf" in schema:
            return self.schema(_merge_all_of(schema, path), name, path)
        for key in ("anyOf", "oneOf"):
            if key in schema:
                alts = schema[key]
                if not isinstance(alts, list) or not alts:
                    raise _fail(path, f"{key} must be a non-empty array")
                base = {k: v for k, v in schema.items() if k != key and k not in _ANNOTATIONS}
                rules = [self.schema({**base, **a} if isinstance(a, dict) and base else a, f"{name}-{i}",
                                     f"{path}/{key}/{i}") for i, a in enumerate(alts)]
                return self.add(name, " | ".join(rules))
        if "const" in schema:
            return self.add(name, self._constant(schema["const"]))
        if "enum" in schema:
            values = schema["enum"]
            if not isinstance(values, list) or not values:
                raise _fail(path, "enum must be a non-empty array")
            return self.add(name, " | ".join(self._constant(v) for v in values))
        types = schema.get("type")
        if isinstance(types, list):
            if not types:
                raise _fail(path, "type must not be an empty array")
            return self.add(name, " | ".join(self.schema({**schema, "type": t}, f"{name}-{t}", path) for t in types))
        if types is not None and types not in _TYPES:
            raise _fail(path, f"unknown type {types!r}")
        kind = types or _implied_type(schema)
        return getattr(self, f"_{kind or 'any'}")(schema, name, path)

    def _constant(self, value: Any) -> str:
        self.primitive("space")
        return literal(json.dumps(value, ensure_ascii=False, separators=(",", ":"))) + " space"

    def _ref(self, ref: Any, path: str) -> str:
        if not isinstance(ref, str) or not ref.startswith("#"):
            raise _fail(path, f"$ref {ref!r}: only references inside the schema (#/...) are supported")
        if ref not in self._refs:
            target: Any = self._doc
            for part in [p.replace("~1", "/").replace("~0", "~") for p in ref[1:].split("/") if p]:
                if not isinstance(target, dict) or part not in target:
                    raise _fail(path, f"$ref {ref!r} does not resolve")
                target = target[part]
            # The rule is named before its body is built, so a recursive schema refers to itself.
            rule = self.add("ref" + re.sub(r"[^a-zA-Z0-9]+", "-", ref[1:]).rstrip("-"), f"<{ref}>")
            self._refs[ref] = rule
            self.rules[rule] = self.schema(target, rule + "-def", ref)
        return self._refs[ref]

    def _any(self, schema: dict, name: str, path: str) -> str:
        return self.primitive("value")

    def _boolean(self, schema: dict, name: str, path: str) -> str:
        return self.primitive("boolean")

    def _null(self, schema: dict, name: str, path: str) -> str:
        return self.primitive("null")

    def _number(self, schema: dict, name: str, path: str) -> str:
        for key in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
            if key in schema:
                raise _fail(path, f"keyword {key!r} on a number is not supported (use type integer, or drop it)")
        return self.primitive("number")

    def _integer(self, schema: dict, name: str, path: str) -> str:
        bounds = {k: schema[k] for k in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum") if k in schema}
        if not bounds:
            return self.primitive("integer")
        for k, v in bounds.items():
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise _fail(path, f"{k} must be a number")
        lows = [_ceil(bounds["minimum"])] if "minimum" in bounds else []
        lows += [_floor(bounds["exclusiveMinimum"]) + 1] if "exclusiveMinimum" in bounds else []
        highs = [_floor(bounds["maximum"])] if "maximum" in bounds else []
        highs += [_ceil(bounds["exclusiveMaximum"]) - 1] if "exclusiveMaximum" in bounds else []
        lo, hi = max(lows, default=None), min(highs, default=None)
        try:
            body = _integer_range(lo, hi)
        except ValueError as exc:
            raise _fail(path, str(exc)) from None
        return self.add(name, f"({body}) {self.primitive('space')}")

    def _string(self, schema: dict, name: str, path: str) -> str:
        body = self.string_body(schema, path)
        if body is None:
            return self.primitive("string")
        return self.add(name, f'"\\"" {body} "\\"" {self.primitive("space")}')

    def string_body(self, schema: dict, path: str) -> str | None:
        """What may stand between the quotes of a string under `schema`'s format/pattern/length (None: anything)."""
        char = self.primitive("char")
        fmt, pattern = schema.get("format"), schema.get("pattern")
        lengths = "minLength" in schema or "maxLength" in schema
        if sum(map(bool, (fmt, pattern, lengths))) > 1:
            raise _fail(path, "format, pattern and minLength/maxLength cannot be combined")
        if fmt is not None:
            if fmt not in _FORMATS:
                raise _fail(path, f"format {fmt!r} is not supported (one of {', '.join(_FORMATS)})")
            return self.primitive(fmt)
        if pattern is not None:
            if not isinstance(pattern, str):
                raise _fail(path, "pattern must be a string")
            return _Pattern(pattern, path).convert()
        if lengths:
            lo, hi = schema.get("minLength", 0), schema.get("maxLength")
            if not isinstance(lo, int) or (hi is not None and not isinstance(hi, int)) or max(lo, hi or 0) > MAX_REPEAT:
                raise _fail(path, f"minLength/maxLength must be integers up to {MAX_REPEAT}")
            return _repeat(char, lo, hi)
        return None

    def _array(self, schema: dict, name: str, path: str) -> str:
        space = self.primitive("space")
        lo, hi = schema.get("minItems", 0), schema.get("maxItems")
        if not isinstance(lo, int) or (hi is not None and not isinstance(hi, int)) or max(lo, hi or 0) > MAX_REPEAT:
            raise _fail(path, f"minItems/maxItems must be integers up to {MAX_REPEAT}")
        prefix = schema.get("prefixItems")
        items = schema.get("items", True)
        if isinstance(items, list):  # draft-07 tuple form
            prefix, items = items, schema.get("additionalItems", False)
        if prefix is not None:  # a fixed tuple (as llama.cpp reads it: never longer than the prefix)
            if lo or hi is not None or items not in (False, True, {}) or not isinstance(prefix, list):
                raise _fail(path, "prefixItems together with items/minItems/maxItems is not supported")
            rules = [self.schema(s, f"{name}-{i}", f"{path}/prefixItems/{i}") for i, s in enumerate(prefix)]
            return self.add(name, '"[" space ' + ' "," space '.join(rules) + ' "]" ' + space)
        item = self.schema(items, f"{name}-item", f"{path}/items")
        return self.add(name, f'"[" space {_repeat(item, lo, hi, sep=chr(34) + "," + chr(34) + " space")} "]" {space}')

    def _object(self, schema: dict, name: str, path: str) -> str:
        if not {"properties", "additionalProperties", "required"} & set(schema):
            return self.primitive("object")  # {"type": "object"}: any object
        props = schema.get("properties") or {}
        if not isinstance(props, dict):
            raise _fail(path, "properties must be an object")
        required = schema.get("required") or []
        if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
            raise _fail(path, "required must be an array of names")
        missing = [r for r in required if r not in props]
        extra = schema.get("additionalProperties", False)
        if missing and extra is False:
            raise _fail(path, f"required {missing} are not in properties")
        kvs = {}
        for key, sub in props.items():
            value = self.schema(sub, f"{name}-{key}", f"{path}/properties/{key}")
            kvs[key] = self.add(f"{name}-{key}-kv", f'{literal(json.dumps(key, ensure_ascii=False))} space ":" space '
                                                     f"{value}")
        order = [k for k in props if k in required] + [k for k in props if k not in required]
        optional = [k for k in props if k not in required]
        if extra is not False:
            value = self.schema({} if extra is True else extra, f"{name}-additional-value", f"{path}/additionalProperties")
            key_rule = self.add(f"{name}-additional-key", self._other_key(list(props)))
            kvs["*"] = self.add(f"{name}-additional-kv", f'{key_rule} ":" space {value}')
            order.append("*")
            optional.append("*")
        self.primitive("space")
        return self.add(name, '"{" space ' + self._members(order, set(optional), kvs, name) + ' "}" space')

    def _members(self, order: list[str], optional: set[str], kvs: dict[str, str], name: str) -> str:
        """Members in `order`; the optional ones may be left out, "*" (additional properties) may repeat."""
        def item(k: str) -> str:
            return f'{kvs[k]} ("," space {kvs[k]})*' if k == "*" else kvs[k]

        # rest[i]: members i.. each preceded by a comma; first[i]: the same with the first member's comma dropped.
        rest, first = "", ""
        for i in range(len(order) - 1, -1, -1):
            k = order[i]
            head = item(k)
            new_rest = f'"," space {head}' + (f" {rest}" if rest else "")
            new_first = head + (f" {rest}" if rest else "")
            if k in optional:
                new_rest = f"({new_rest})?" if not rest else f"({new_rest} | {rest})"
                new_first = f"{new_first} | {first}" if first else new_first
                new_first = self.add(f"{name}-first-{i}", new_first)
            if len(order) - i > 1:
                new_rest = self.add(f"{name}-rest-{i}", new_rest)
            rest, first = new_rest, new_first
        if not order:
            return ""
        if order[0] in optional:
            return f"({first})?"
        return first

    def _other_key(self, names: list[str]) -> str:
        """A JSON string key that is none of `names` (so additional properties cannot shadow declared ones)."""
        self.primitive("char")
        self.primitive("space")
        if not names:
            return '"\\"" char* "\\"" space'
        trie: dict = {}
        for n in names:
            node = trie
            for c in n:
                node = node.setdefault(c, {})
            node[""] = {}

        def visit(node: dict) -> str:
            chars = sorted(c for c in node if c)
            alts = [f"{literal(c)} ({visit(node[c])})" for c in chars]
            escaped = "".join(_class_char(c) for c in chars)
            alts.append(f'[^"{escaped}\\\\\\x00-\\x1F\\x7F] char*' if chars else "char+")
            if "" not in node:
                alts.append('""')
            return " | ".join(alts)

        return f'"\\"" ({visit(trie)}) "\\"" space'


def _implied_type(schema: dict) -> str | None:
    if any(k in schema for k in ("properties", "additionalProperties", "required")):
        return "object"
    if any(k in schema for k in ("items", "prefixItems", "minItems", "maxItems")):
        return "array"
    if any(k in schema for k in ("pattern", "format", "minLength", "maxLength")):
        return "string"
    if any(k in schema for k in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")):
        return "number"
    return None


def _merge_all_of(schema: dict, path: str) -> dict:
    """allOf of object schemas -> one object schema (properties and required merged); anything else refused."""
    merged: dict[str, Any] = {k: v for k, v in schema.items() if k != "allOf"}
    props: dict[str, Any] = dict(merged.get("properties") or {})
    required: list[str] = list(merged.get("required") or [])
    for i, part in enumerate(schema["allOf"] if isinstance(schema["allOf"], list) else []):
        if not isinstance(part, dict) or set(part) - {"type", "properties", "required", "additionalProperties"} \
                - _ANNOTATIONS or part.get("type", "object") != "object":
            raise _fail(f"{path}/allOf/{i}", "allOf is supported for object schemas with properties/required only")
        for key, sub in (part.get("properties") or {}).items():
            if key in props and props[key] != sub:
                raise _fail(f"{path}/allOf/{i}", f"property {key!r} is defined twice with different schemas")
            props[key] = sub
        required += [r for r in part.get("required") or [] if r not in required]
    merged.update(type="object", properties=props, required=required)
    return merged


def _floor(v: float) -> int:
    return int(v // 1)


def _ceil(v: float) -> int:
    return -int(-v // 1)


def schema_grammar(schema: Any) -> str:
    """A JSON Schema -> GBNF whose `root` matches exactly the JSON texts valid under it (see the module doc)."""
    builder = GrammarBuilder(schema)
    rule = builder.schema(schema, "root")
    if rule != "root":
        builder.rules["root"] = rule
    return builder.format("root")


def response_format_grammar(fmt: Any) -> str:
    """OpenAI `response_format` -> GBNF ("" for text). Raises InvalidRequestError (param response_format)."""
    if fmt is None:
        return ""
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    try:
        if kind == "text":
            return ""
        if kind == "json_object":
            return schema_grammar(fmt.get("schema") or {"type": "object"})
        if kind == "json_schema":
            spec = fmt.get("json_schema")
            if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), (dict, bool)):
                raise InvalidRequestError("response_format json_schema needs {\"json_schema\": {\"schema\": {...}}}")
            return schema_grammar(spec.get("schema", {}))
    except InvalidRequestError as exc:
        exc.param = "response_format"  # type: ignore[attr-defined]
        raise
    err = InvalidRequestError(f"response_format type must be text, json_object or json_schema, not {kind!r}")
    err.param = "response_format"  # type: ignore[attr-defined]
    raise err


# ----------------------------------------------------------------------------------------- tool calls


def _not_text(builder: GrammarBuilder, stop: str) -> str:
    """A rule matching any text that does not contain `stop`."""
    alts = [f"[^{_class_char(stop[0])}]"]
    for n in range(1, len(stop)):
        alts.append(f"{literal(stop[:n])} [^{_class_char(stop[n])}]")
    return builder.add(f"not-{stop}", f"({' | '.join(alts)})*")


def tool_function(tool: Any, index: int = 0) -> dict[str, Any]:
    """The function of `tool` (`{"type": "function", "function": {...}}`, or the function object itself), checked:
    a non-empty string `name`, and `parameters` a JSON Schema object when given. Errors name `Tools[index]`."""
    fn = tool.get("function", tool) if isinstance(tool, dict) else None
    where = f"Tools[{index}]"
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
        raise InvalidRequestError("each tool must be {\"type\": \"function\", \"function\": {\"name\": ...}}",
                                  param=where)
    if fn.get("parameters") is not None and not isinstance(fn["parameters"], dict):
        raise InvalidRequestError("parameters must be a JSON Schema object",
                                  param=f"{where}.parameters" if fn is tool else f"{where}.function.parameters")
    return fn


def _hermes_call(builder: GrammarBuilder, fn: dict[str, Any], i: int) -> str:
    args = builder.schema(fn.get("parameters") or {"type": "object"}, f"tool{i}-args", f"tools[{i}].parameters")
    name = literal(json.dumps(fn["name"], ensure_ascii=False))
    return builder.add(f"tool{i}-call", f'{literal(CALL_OPEN)} "\\n"? "{{" space "\\"name\\"" space ":" space {name} '
                                        f'space "," space "\\"arguments\\"" space ":" space {args} "}}" space '
                                        f'{literal(CALL_CLOSE)}')


def _xml_call(builder: GrammarBuilder, fn: dict[str, Any], i: int) -> str:
    params = fn.get("parameters") or {}
    props = params.get("properties") or {}
    required = set(params.get("required") or [])
    kvs = {}
    for key, sub in props.items():
        where = f"tools[{i}].parameters.properties.{key}"
        if isinstance(sub, dict) and sub.get("type") == "string":  # strings are written raw, as the template does
            if isinstance(sub.get("enum"), list) and all(isinstance(v, str) for v in sub["enum"]):
                value = builder.add(f"tool{i}-{key}", " | ".join(literal(v) for v in sub["enum"]))
            else:
                value = builder.string_body(sub, where) or _not_text(builder, PARAM_CLOSE)
        else:  # typed values are written as JSON (templates render them with tojson)
            value = builder.schema(sub, f"tool{i}-{key}", where)
        kvs[key] = builder.add(f"tool{i}-{key}-kv", f'{literal(PARAM_OPEN + key + ">")} "\\n" {value} "\\n"? '
                                                     f'{literal(PARAM_CLOSE)} "\\n"')
    order = [k for k in props if k in required] + [k for k in props if k not in required]
    members = " ".join(f"({kvs[k]})?" if k not in required else kvs[k] for k in order)
    return builder.add(f"tool{i}-call", f'{literal(CALL_OPEN + chr(10) + FUNC_OPEN + fn["name"] + ">")} "\\n" '
                                        f'{members} {literal(FUNC_CLOSE + chr(10) + CALL_CLOSE)}')


def tool_call_grammar(syntax: ToolSyntax, tools: list[Any], *, name: str | None = None, parallel: bool = True,
                      thinking: bool = False) -> str:
    """GBNF for one or more calls (`parallel`) of `tools` — or of the function `name` only — in `syntax`.

    `thinking`: the prompt leaves the model inside a reasoning block, which it may finish before calling.
    """
    fns = [tool_function(t, i) for i, t in enumerate(tools)]
    if name is not None:
        fns = [f for f in fns if f["name"] == name]
        if not fns:
            raise InvalidRequestError(f"tool_choice names {name!r}, which is not among the tools")
    builder = GrammarBuilder({"tools": tools})
    build = _xml_call if syntax.body == "xml" else _hermes_call
    call = builder.add("call", " | ".join(build(builder, f, i) for i, f in enumerate(fns)))
    calls = f'{call} ("\\n" {call})*' if parallel else call
    if thinking:
        calls = f'{_not_text(builder, "</think>")} "</think>" space {calls}'
    builder.rules["root"] = calls
    builder.primitive("space")
    return builder.format("root")


def trigger_patterns(words: tuple[str, ...] | list[str]) -> list[str]:
    """llama.cpp lazy-grammar trigger patterns (ECMAScript regex) for literal words: the grammar starts at the
    first occurrence of any of them. Every regex metacharacter is escaped, so no pattern can fail to compile."""
    return ["".join(f"\\{c}" if c in r"\^$.|?*+()[]{}" else c for c in w) for w in words if w]
