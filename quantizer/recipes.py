"""APEX tiers as data: load `recipes.yaml` into `Tier` objects and answer "which type for this role and layer".

A tier is a recipe (types per role x band) plus whether an importance matrix is used. `Quality` and `I-Quality`
share one recipe; tiers whose types need an imatrix (IQ1/IQ2) exist only as `I-` names, as upstream publishes them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import yaml

from backend.core.errors import RecipeError

RECIPES_PATH = Path(__file__).with_name("recipes.yaml")
IMATRIX_PREFIX = "I-"
BandMode = Literal["fixed", "scaled"]
BANDED_ROLES = ("routed", "shared", "dense_ffn", "attn")
MTP_ROLES = ("routed", "shared", "dense_ffn", "attn", "proj", "embed", "head")


@dataclass(frozen=True)
class BandWidths:
    """Band widths in trunk layers: routed edge/near, shared edge, attention edge."""

    routed_edge: int
    routed_near: int
    shared_edge: int
    attn_edge: int

    def scaled(self, n_layers: int, reference_layers: int) -> BandWidths:
        """Each width scaled to `n_layers` as ceil(n_layers * width / reference_layers), at least 1."""

        def scale(w: int) -> int:
            return max(1, math.ceil(n_layers * w / reference_layers))

        return BandWidths(*(scale(w) for w in (self.routed_edge, self.routed_near, self.shared_edge, self.attn_edge)))


@dataclass(frozen=True)
class Tier:
    """One buildable tier: e.g. `I-Balanced` = recipe `Balanced` + importance matrix."""

    name: str
    recipe: str
    imatrix: bool
    base_ftype: str
    band_types: dict[str, dict[str, str]] = field(hash=False)  # role -> band -> ggml type
    token_embd: str = "Q8_0"
    output: str = "Q8_0"
    mtp: dict[str, str] = field(default_factory=dict, hash=False)  # MTP role -> ggml type
    widths: BandWidths = BandWidths(5, 5, 5, 3)
    band_mode: BandMode = "fixed"
    reference_layers: int = 40

    def with_bands(self, mode: BandMode) -> Tier:
        """The same tier with fixed (upstream) or depth-scaled band widths."""
        if mode not in ("fixed", "scaled"):
            raise RecipeError(f"band mode must be 'fixed' or 'scaled', got {mode!r}")
        return replace(self, band_mode=mode)

    def widths_for(self, n_layers: int) -> BandWidths:
        """Band widths for a trunk of `n_layers` layers under this tier's band mode."""
        if self.band_mode == "scaled":
            return self.widths.scaled(n_layers, self.reference_layers)
        return self.widths

    def band(self, role: str, layer: int, n_layers: int, *, dense: bool = False) -> str:
        """Band name of trunk `layer` (0-based) for a banded `role`: edge/near/mid or edge/rest.

        `dense`: the model has no routed experts (see `dense_model` in recipes.yaml).
        """
        family = _role_map("band_family", dense)[role]
        w = self.widths_for(n_layers)
        dist = min(layer, n_layers - 1 - layer)  # distance to the nearer end of the trunk
        if family == "routed":
            if dist < w.routed_edge:
                return "edge"
            return "near" if dist < w.routed_edge + w.routed_near else "mid"
        edge = w.shared_edge if family == "shared" else w.attn_edge
        return "edge" if dist < edge else "rest"

    def trunk_type(self, role: str, layer: int, n_layers: int, *, dense: bool = False) -> tuple[str, str]:
        """`(band, ggml type)` for a banded role in trunk `layer`."""
        band = self.band(role, layer, n_layers, dense=dense)
        return band, self.band_types[_role_map("types_from", dense).get(role, role)][band]


def _role_map(key: str, dense: bool) -> dict[str, str]:
    """`band_family` or `types_from`, with the dense-model overrides applied when `dense`."""
    cfg = _config()
    return {**cfg[key], **(cfg["dense_model"].get(key, {}) if dense else {})}


@lru_cache(maxsize=4)
def _load(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except (OSError, yaml.YAMLError) as exc:
        raise RecipeError(f"cannot read recipes {path}: {exc}") from exc
    if not isinstance(data, dict) or "tiers" not in data:
        raise RecipeError(f"{path}: no 'tiers' mapping")
    return data


def _config() -> dict[str, Any]:
    return _load(str(RECIPES_PATH))


def llama_quant_facts() -> dict[str, Any]:
    """The `llama_quant` section: never-quantized names, imatrix-requiring types, shape fallbacks."""
    return _config()["llama_quant"]


def classification() -> dict[str, Any]:
    """The `classification` section: global tensor names and per-layer role regexes."""
    return _config()["classification"]


def _build(recipe: str, spec: dict[str, Any], imatrix: bool, bands: dict[str, Any]) -> Tier:
    from .types import check_type

    name = (IMATRIX_PREFIX if imatrix else "") + recipe
    try:
        band_types = {role: {b: check_type(t) for b, t in spec[role].items()} for role in ("routed", "shared", "attn")}
        mtp = {role: check_type(spec["mtp"][role]) for role in MTP_ROLES}
        return Tier(
            name=name,
            recipe=recipe,
            imatrix=imatrix,
            base_ftype=str(spec["base_ftype"]),
            band_types=band_types,
            token_embd=check_type(spec["token_embd"]),
            output=check_type(spec["output"]),
            mtp=mtp,
            widths=BandWidths(**bands["fixed"]),
            reference_layers=int(bands["reference_layers"]),
        )
    except (KeyError, TypeError) as exc:
        raise RecipeError(f"recipe {recipe!r} is missing or malforms {exc}") from exc


def all_tiers() -> dict[str, Tier]:
    """Every buildable tier by name, in recipe order (plain before `I-` where both exist)."""
    cfg = _config()
    out: dict[str, Tier] = {}
    for recipe, spec in cfg["tiers"].items():
        mode = spec.get("imatrix", "optional")
        if mode not in ("optional", "required"):
            raise RecipeError(f"recipe {recipe!r}: imatrix must be 'optional' or 'required', got {mode!r}")
        for imatrix in ((False, True) if mode == "optional" else (True,)):
            tier = _build(recipe, spec, imatrix, cfg["bands"])
            out[tier.name] = tier
    return out


def get_tier(name: str, bands: BandMode = "fixed") -> Tier:
    """Look a tier up by name, case-insensitively (`i-balanced` works).

    Raises:
        RecipeError: unknown name; for a plain name that only exists with an imatrix, the message says so.
    """
    tiers = all_tiers()
    by_lower = {k.lower(): v for k, v in tiers.items()}
    tier = by_lower.get(name.strip().lower())
    if tier is None:
        if (IMATRIX_PREFIX + name.strip()).lower() in by_lower:
            raise RecipeError(
                f"tier {name!r} needs an importance matrix (its IQ1/IQ2 types cannot be built without one): "
                f"use {IMATRIX_PREFIX}{name.strip()}"
            )
        raise RecipeError(f"unknown tier {name!r}; known tiers: {', '.join(tiers)}")
    return tier.with_bands(bands)


def parse_tiers(spec: str, bands: BandMode = "fixed") -> list[Tier]:
    """Parse a comma list such as `"I-Balanced,I-Compact"` (or `all`) into tiers, keeping order, no duplicates."""
    names = list(all_tiers()) if spec.strip().lower() == "all" else [s for s in spec.split(",") if s.strip()]
    if not names:
        raise RecipeError("no tier given (e.g. --tier I-Balanced,I-Compact)")
    tiers: list[Tier] = []
    for n in names:
        tier = get_tier(n, bands)
        if tier.name not in {t.name for t in tiers}:
            tiers.append(tier)
    return tiers
