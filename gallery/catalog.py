"""The gallery as Python objects: entries of index.yaml, architecture facts, the selection policy and hardware classes.

Everything is loaded from the YAML files next to this module (or another directory, for tests), validated by
`gallery.schema`, and returned as frozen dataclasses. Queries: by name, by family (the tiers a hub entry offers), by
repository + tier or file name, and free-text search.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml

from backend.core.errors import EntryNotFoundError, SchemaError

from . import schema
from .policy import Policy

DATA_DIR = Path(__file__).resolve().parent
GALLERY_NAME = "apexmtp"  # the `<gallery>@<name>` prefix LocalAI uses for our index


def load_yaml(path: Path) -> Any:
    """Parse one YAML file, turning syntax errors into `SchemaError` that names the file and line."""
    try:
        with open(path, encoding="utf-8") as f:
            return yaml.safe_load(f)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark is not None else "(file)"
        raise SchemaError(path.name, "-", where, f"invalid YAML: {getattr(exc, 'problem', exc)}") from None


@dataclass(frozen=True)
class GalleryFile:
    """One file of an entry: where it goes under the models dir, where it comes from, and its pinned sha256."""

    filename: str
    uri: str
    sha256: str | None = None


@dataclass(frozen=True)
class WeightBytes:
    """Bytes of a GGUF's tensor data by role: what must stay in host RAM (token_embd), what may move there (routed
    experts), the MTP layer (loaded only with MTP on), and the rest."""

    total: int
    token_embd: int
    routed_experts: int
    mtp: int
    output_tied: bool = False  # no output.weight: token_embd is the LM head too (read in full every token)
    quantized: bool = True  # most bytes in quantized types (APEX tiers are); f16/bf16/f32 files are not

    @property
    def other(self) -> int:
        return self.total - self.token_embd - self.routed_experts - self.mtp


@dataclass(frozen=True)
class Entry:
    """A gallery entry (one tier of one family, or the family's hub entry)."""

    name: str
    description: str
    tags: tuple[str, ...]
    license: str
    urls: tuple[str, ...]
    files: tuple[GalleryFile, ...]
    family: str
    repo: str
    tier: str
    architecture: str
    nextn_predict_layers: int
    weights: WeightBytes
    kl_mean: float | None
    variants: tuple[str, ...]
    raw: dict[str, Any] = field(repr=False, compare=False)

    @property
    def overrides(self) -> dict[str, Any]:
        return self.raw["overrides"]

    @property
    def options(self) -> tuple[str, ...]:
        return tuple(self.overrides.get("options", ()))

    @property
    def model_file(self) -> GalleryFile:
        """The GGUF named by `overrides.parameters.model` (schema guarantees it is one of `files`)."""
        model = self.overrides["parameters"]["model"]
        return next(f for f in self.files if f.filename == model)

    @property
    def mmproj_file(self) -> GalleryFile | None:
        """The vision projector named by `overrides.mmproj` (schema guarantees it is one of `files`), if any."""
        mmproj = self.overrides.get("mmproj")
        return next((f for f in self.files if f.filename == mmproj), None) if mmproj else None

    @property
    def is_hub(self) -> bool:
        return bool(self.variants)

    @property
    def file_name(self) -> str:
        """The GGUF's name in its repository (last part of the URI)."""
        return self.model_file.uri.rsplit("/", 1)[-1]


@dataclass(frozen=True)
class Catalog:
    """All gallery data, validated."""

    entries: dict[str, Entry]
    architectures: dict[str, dict[str, Any]]
    policy: Policy
    classes: tuple[dict[str, Any], ...]
    source_dir: Path

    @property
    def tier_order(self) -> list[str]:
        return list(self.policy.tier_order)

    def get(self, name: str) -> Entry:
        """The entry called `name` (case-insensitive).

        Raises:
            EntryNotFoundError: with the closest names as a hint.
        """
        entry = self.entries.get(name.lower())
        if entry is None:
            close = difflib.get_close_matches(name.lower(), self.entries, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else "; `apexmtp gallery list` shows them all"
            raise EntryNotFoundError(f"no gallery entry named {name!r}{hint}")
        return entry

    def hubs(self) -> list[Entry]:
        """Family entries (those declaring variants), in file order."""
        return [e for e in self.entries.values() if e.is_hub]

    def family_tiers(self, entry: Entry) -> list[Entry]:
        """The tiers `entry` stands for, best quality first: its variants for a hub, else the entry itself."""
        if not entry.is_hub:
            return [entry]
        tiers = [self.entries[v] for v in entry.variants]
        order = self.tier_order
        return sorted(tiers, key=lambda e: order.index(e.tier))

    def find_tier(self, repo: str, tier: str) -> Entry | None:
        """The non-hub entry of `repo` whose tier is `tier` (both case-insensitive), if any."""
        for e in self.entries.values():
            if not e.is_hub and e.repo.lower() == repo.lower() and e.tier.lower() == tier.lower():
                return e
        return None

    def find_file(self, repo: str, file_name: str) -> Entry | None:
        """The non-hub entry serving `file_name` from `repo`, if any."""
        for e in self.entries.values():
            if not e.is_hub and e.repo.lower() == repo.lower() and e.file_name == file_name:
                return e
        return None

    def hub_for_repo(self, repo: str) -> Entry | None:
        """The hub entry whose family lives in `repo`, if any."""
        return next((e for e in self.hubs() if e.repo.lower() == repo.lower()), None)

    def search(self, query: str) -> list[Entry]:
        """Entries whose name, tier, repo, tags or description contain every word of `query` (case-insensitive)."""
        words = query.lower().split()
        found = []
        for e in self.entries.values():
            text = " ".join((e.name, e.tier, e.repo, " ".join(e.tags), e.description)).lower()
            if all(w in text for w in words):
                found.append(e)
        return found


def _entry(raw: dict[str, Any]) -> Entry:
    apex = raw["apexmtp"]
    return Entry(
        name=raw["name"],
        description=raw["description"].strip(),
        tags=tuple(raw["tags"]),
        license=raw["license"],
        urls=tuple(raw["urls"]),
        files=tuple(GalleryFile(f["filename"], f["uri"], f.get("sha256")) for f in raw["files"]),
        family=apex["family"],
        repo=apex["repo"],
        tier=apex["tier"],
        architecture=apex["architecture"],
        nextn_predict_layers=apex["nextn_predict_layers"],
        weights=WeightBytes(**{k: apex["bytes"][k] for k in schema.BYTES_FIELDS}),
        kl_mean=apex.get("kl_mean"),
        variants=tuple(v["model"] for v in raw.get("variants") or ()),
        raw=raw,
    )


def load_catalog(data_dir: Path | str | None = None) -> Catalog:
    """Load and validate the gallery in `data_dir` (default: the package's own YAML files).

    Raises:
        SchemaError: a file is missing, is not YAML, or breaks its schema (the message names file, entry, field).
    """
    return _load_catalog(Path(data_dir or DATA_DIR).resolve())


def reload_catalog(data_dir: Path | str | None = None) -> Catalog:
    """Like `load_catalog`, after dropping cached copies (the YAML files changed on disk)."""
    _load_catalog.cache_clear()
    return load_catalog(data_dir)


@lru_cache(maxsize=8)
def _load_catalog(data_dir: Path) -> Catalog:
    paths = {name: data_dir / f"{name}.yaml" for name in ("index", "architectures", "hardware")}
    for path in paths.values():
        if not path.is_file():
            raise SchemaError(path.name, "-", "(file)", f"missing: {path}")
    hardware = load_yaml(paths["hardware"])
    policy = schema.validate_hardware(hardware, "hardware.yaml")
    archs = schema.validate_architectures(load_yaml(paths["architectures"]), "architectures.yaml")
    index = load_yaml(paths["index"])
    schema.validate_index(index, "index.yaml", architectures=archs, tiers=list(policy.tier_order))
    entries = {raw["name"]: _entry(raw) for raw in index}
    return Catalog(entries, archs, policy, tuple(hardware["classes"]), data_dir)
