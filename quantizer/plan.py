"""Per-tensor type plans: which ggml type every tensor of a model gets in a tier, and the rules that say so.

A plan is computed from the tensor table alone (names, shapes, source types, block_count, nextn layers), so it
works on a GGUF header, on a sparse real-size layout, or on the published inventory of a model nobody has
downloaded. It mirrors what llama.cpp will do (eligibility, shape fallback, imatrix requirement), predicts the
output size, and exports anchored, escaped `pattern=type` rules for `llama-quantize --tensor-type-file` or
`tt_overrides`: one rule per (tensor set, type), each quantizable tensor matched by exactly one rule.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from backend.core.errors import PlanError
from backend.core.gguf_file import n_elements

from . import types as gt
from .recipes import Tier, llama_quant_facts
from .roles import TensorRole, allows_quantization, classify

_BLOCK = re.compile(r"^blk\.(\d+)\.(.+)$")
# GGUF KV bytes of general.quantization_version (u32), which llama.cpp adds when the source lacks it.
_QVERSION_KV_BYTES = 8 + len("general.quantization_version") + 4 + 4


@dataclass(frozen=True)
class TensorSpec:
    """A tensor as the planner sees it: name, ggml dims (ne[0] = row length), source ggml type."""

    name: str
    ne: tuple[int, ...]
    type_name: str

    @property
    def n_elements(self) -> int:
        return n_elements(self.ne)


@dataclass(frozen=True)
class ModelLayout:
    """What a plan is computed from. `header_bytes` is the source's metadata size (0 when unknown)."""

    name: str
    architecture: str
    block_count: int
    nextn_layers: int
    tensors: tuple[TensorSpec, ...]
    header_bytes: int = 0
    alignment: int = 32
    has_quantization_version: bool = True

    @property
    def trunk_layers(self) -> int:
        return self.block_count - self.nextn_layers

    @property
    def has_mtp(self) -> bool:
        return self.nextn_layers > 0

    @classmethod
    def from_gguf(cls, path: str | Path) -> ModelLayout:
        """Read a GGUF header (checked by `backend.core.gguf_file.read_gguf`) into a layout."""
        from backend.core.gguf_file import read_gguf

        info = read_gguf(path)
        tensors = tuple(TensorSpec(t.name, t.ne, t.type_name) for t in info.tensors)
        header = min((t.offset for t in info.tensors), default=info.file_size)
        name = str(info.metadata.get("general.name") or Path(path).stem)
        return cls(
            name=name,
            architecture=info.architecture,
            block_count=info.block_count,
            nextn_layers=info.nextn_layers,
            tensors=tensors,
            header_bytes=header,
            alignment=int(info.metadata.get("general.alignment", 32) or 32),
            has_quantization_version="general.quantization_version" in info.metadata,
        )


@dataclass(frozen=True)
class PlannedTensor:
    """One tensor's decision. `target_type` is what llama.cpp will write (after the shape fallback)."""

    name: str
    ne: tuple[int, ...]
    source_type: str
    role: str | None
    layer: int | None
    band: str | None
    requested_type: str | None
    target_type: str
    quantize: bool
    needs_imatrix: bool

    @property
    def n_bytes(self) -> int:
        return gt.tensor_bytes(self.target_type, self.ne)

    @property
    def imatrix_size(self) -> int:
        """Floats llama.cpp expects in this tensor's imatrix entry: ne[0] x experts."""
        return self.ne[0] * (self.ne[2] if len(self.ne) > 2 else 1)


@dataclass(frozen=True)
class Rule:
    """One `pattern=type` line; `pattern` is an anchored ECMAScript/Python-compatible regex."""

    pattern: str
    type_name: str

    def __str__(self) -> str:
        return f"{self.pattern}={gt.ggml_name(self.type_name)}"

    @cached_property
    def regex(self) -> re.Pattern[str]:
        return re.compile(self.pattern)


@dataclass(frozen=True)
class Plan:
    """A tier applied to a layout: every tensor's type, the rules, and the predicted file size."""

    tier: Tier
    layout: ModelLayout
    tensors: tuple[PlannedTensor, ...]
    rules: tuple[Rule, ...] = field(default=())

    @property
    def quantized(self) -> tuple[PlannedTensor, ...]:
        return tuple(t for t in self.tensors if t.quantize)

    @property
    def imatrix_tensors(self) -> tuple[PlannedTensor, ...]:
        """Tensors whose target type makes llama.cpp abort without imatrix data."""
        return tuple(t for t in self.tensors if t.needs_imatrix)

    @property
    def tensor_data_bytes(self) -> int:
        a = self.layout.alignment
        return sum(-(-t.n_bytes // a) * a for t in self.tensors)

    def predicted_bytes(self, extra_kv_bytes: int = 0) -> int:
        """Predicted output file size: source header (+ keys llama.cpp adds) + aligned tensor data."""
        header = self.layout.header_bytes + extra_kv_bytes
        if self.layout.header_bytes and not self.layout.has_quantization_version:
            header += _QVERSION_KV_BYTES
        return header + self.tensor_data_bytes

    def type_of(self, name: str) -> str:
        """Planned target type of a tensor by name."""
        for t in self.tensors:
            if t.name == name:
                return t.target_type
        raise KeyError(name)

    def to_type_file(self) -> str:
        """The rules as a `--tensor-type-file`: one `pattern=type` per line, no comments (the parser has none)."""
        return "".join(f"{r}\n" for r in self.rules)

    def summary(self) -> list[tuple[str, str, str, int, int]]:
        """Rows `(role, band, type, n_tensors, bytes)` grouped over the plan, largest first."""
        acc: dict[tuple[str, str, str], list[int]] = defaultdict(lambda: [0, 0])
        for t in self.tensors:
            key = (t.role or "kept", t.band or "-", t.target_type)
            acc[key][0] += 1
            acc[key][1] += t.n_bytes
        return sorted(((*k, n, b) for k, (n, b) in acc.items()), key=lambda r: -r[4])


def _requested(tier: Tier, layout: ModelLayout, role: TensorRole, tied: bool, dense: bool) -> tuple[str | None, str]:
    """(band, requested type) for a classified tensor."""
    if role.layer is None:
        # A tied embedding is also the LM head: give it the output type, as llama.cpp's own mixtures do.
        typ = tier.output if role.role == "output" or tied else tier.token_embd
        return None, typ
    if role.mtp:
        return "mtp", tier.mtp[role.role]
    return tier.trunk_type(role.role, role.layer, layout.trunk_layers, dense=dense)


def _plan_tensor(tier: Tier, layout: ModelLayout, spec: TensorSpec, tied: bool, dense: bool) -> PlannedTensor | str:
    """Plan one tensor; returns its name when it is quantizable but no role rule knows it."""
    facts = llama_quant_facts()
    layer_m = _BLOCK.match(spec.name)
    layer = int(layer_m.group(1)) if layer_m else None
    if not allows_quantization(spec.name, spec.ne):
        return PlannedTensor(spec.name, spec.ne, spec.type_name, None, layer, None, None, spec.type_name, False, False)
    role = classify(spec.name, layout.trunk_layers)
    if role is None:
        return spec.name
    band, requested = _requested(tier, layout, role, tied, dense)
    target = gt.fallback_type(requested, spec.ne[0], facts["fallback"])
    needs = target in facts["requires_imatrix"] and spec.name not in facts["imatrix_exempt"]
    return PlannedTensor(spec.name, spec.ne, spec.type_name, role.role, layer, band, requested, target, True, needs)


def build_plan(layout: ModelLayout, tier: Tier) -> Plan:
    """Apply `tier` to every tensor of `layout`, derive the rules and check that they cover the plan exactly.

    Raises:
        PlanError: a quantizable tensor has no known role, the layout's block counts are inconsistent, or the
            generated rules do not match each quantizable tensor exactly once (a bug guard).
    """
    if layout.block_count <= 0 or not 0 <= layout.nextn_layers < layout.block_count:
        raise PlanError(
            f"{layout.name}: block_count {layout.block_count} and nextn_predict_layers {layout.nextn_layers} "
            "are inconsistent"
        )
    tied = not any(t.name == "output.weight" for t in layout.tensors)
    roles = (classify(t.name, layout.trunk_layers) for t in layout.tensors)
    dense = not any(r is not None and r.role == "routed" for r in roles)
    planned = [_plan_tensor(tier, layout, spec, tied, dense) for spec in layout.tensors]
    unknown = [p for p in planned if isinstance(p, str)]
    if unknown:
        shown = ", ".join(unknown[:8]) + (" ..." if len(unknown) > 8 else "")
        raise PlanError(f"{layout.name}: {len(unknown)} quantizable tensor(s) have no role in recipes.yaml: {shown}")
    tensors = tuple(p for p in planned if not isinstance(p, str))
    rules = make_rules(tensors)
    problems = check_rules(tensors, rules)
    if problems:
        raise PlanError(f"{layout.name}/{tier.name}: rules do not cover the plan exactly: " + "; ".join(problems[:5]))
    return Plan(tier=tier, layout=layout, tensors=tensors, rules=rules)


def _alternation(items: Sequence[str]) -> str:
    return items[0] if len(items) == 1 else "(?:" + "|".join(items) + ")"


def make_rules(tensors: Iterable[PlannedTensor]) -> tuple[Rule, ...]:
    """Anchored, escaped rules, one per (set of layers, type), covering exactly the quantized tensors.

    Tensors with the same suffix and type are grouped across layers; suffixes sharing a layer set and type are
    merged into one alternation, so a 40-layer model needs a few dozen lines instead of hundreds.
    """
    layers_of: dict[tuple[str, str], list[int]] = defaultdict(list)
    rules: list[Rule] = []
    for t in tensors:
        if not t.quantize:
            continue
        m = _BLOCK.match(t.name)
        if m is None:
            rules.append(Rule("^" + re.escape(t.name) + "$", t.target_type))
        else:
            layers_of[(m.group(2), t.target_type)].append(int(m.group(1)))
    suffixes_of: dict[tuple[tuple[int, ...], str], list[str]] = defaultdict(list)
    for (suffix, typ), layers in layers_of.items():
        suffixes_of[(tuple(sorted(layers)), typ)].append(suffix)
    for (layer_ids, typ), suffixes in sorted(suffixes_of.items(), key=lambda kv: (kv[0][0], sorted(kv[1]))):
        layer_rx = _alternation([str(i) for i in layer_ids])
        suffix_rx = _alternation([re.escape(s) for s in sorted(suffixes)])
        rules.append(Rule(rf"^blk\.{layer_rx}\.{suffix_rx}$", typ))
    return tuple(rules)


def check_rules(tensors: Iterable[PlannedTensor], rules: Sequence[Rule]) -> list[str]:
    """Problems with `rules` for a plan: quantizable tensors matched by zero or several rules or given the wrong
    type, and kept tensors matched at all. Empty list = exact cover."""
    problems: list[str] = []
    for t in tensors:
        hits = [r for r in rules if r.regex.search(t.name)]
        if not t.quantize:
            if hits:
                problems.append(f"{t.name} is never quantized but matches {hits[0].pattern}")
            continue
        if len(hits) != 1:
            problems.append(f"{t.name} matches {len(hits)} rules")
        elif hits[0].type_name != t.target_type:
            problems.append(f"{t.name}: rule says {hits[0].type_name}, plan says {t.target_type}")
    return problems


def parse_type_file(text: str) -> tuple[Rule, ...]:
    """Parse a `--tensor-type-file` the way llama-quantize does: whitespace-separated `pattern=type` tokens,
    pattern lower-cased, split at the first `=`.

    Raises:
        PlanError: a token without `=`, an empty side, or an unknown type (llama-quantize would refuse it too).
    """
    rules = []
    for token in text.split():
        pattern, sep, typ = token.partition("=")
        if not sep or not pattern or not typ:
            raise PlanError(f"malformed tensor type {token!r} (expected pattern=type; the format has no comments)")
        try:
            rules.append(Rule(pattern.lower(), gt.check_type(typ)))
        except ValueError as exc:
            raise PlanError(f"{token!r}: {exc}") from exc
    return tuple(rules)


def first_match_types(layout: ModelLayout, rules: Sequence[Rule]) -> dict[str, str | None]:
    """For each quantizable tensor, the type llama-quantize's first-match-wins rule lookup gives it (None = no
    rule: the base ftype's mixture decides). Lets an upstream APEX config be compared with a plan."""
    out: dict[str, str | None] = {}
    for spec in layout.tensors:
        if allows_quantization(spec.name, spec.ne):
            hit = next((r for r in rules if r.regex.search(spec.name)), None)
            out[spec.name] = hit.type_name if hit else None
    return out
