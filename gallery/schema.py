"""Schema checks for the gallery's YAML files, with errors that name the file, the entry and the field.

The checks are plain functions over parsed YAML (no schema library): each file has one `validate_*` function, and
`Field` helpers keep every message in the same shape: `index.yaml: entry 'x', field 'files[0].sha256': ...`.
Cross-field rules that LocalAI relies on are checked too (tag `mtp` iff the options enable draft-mtp, the model
path is one of the entry's files, variants point at existing entries without variants of their own).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from pathlib import PurePosixPath
from typing import Any

from backend.core.errors import InvalidRequestError, SchemaError
from backend.core.units import parse_size

from .policy import (
    Acceptance,
    AppleBand,
    DeviceSpeed,
    GpuBandwidth,
    GpuBuild,
    GpuBuilds,
    MtpPolicy,
    Objectives,
    Policy,
    Reserve,
    SpeedPolicy,
)

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]*$")
REPO_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
MTP_OPTION = "spec_type:draft-mtp"
BYTES_FIELDS = ("total", "token_embd", "routed_experts", "mtp")
ARCH_INT_KEYS = (
    "block_count",
    "context_length",
    "embedding_length",
    "vocab_size",
    "attention.head_count_kv",
    "attention.key_length",
    "attention.value_length",
)
ARCH_OPTIONAL_INT_KEYS = (
    "full_attention_interval",
    "ssm.conv_kernel",
    "ssm.state_size",
    "ssm.group_count",
    "ssm.inner_size",
    "expert_count",
)


class Checker:
    """Raises `SchemaError` for one entry of one file; `where` is the entry name (or `-` for file-level fields)."""

    def __init__(self, source: str, entry: str = "-") -> None:
        self.source = source
        self.entry = entry

    def fail(self, field: str, problem: str) -> SchemaError:
        return SchemaError(self.source, self.entry, field, problem)

    def get(self, mapping: Mapping[str, Any], field: str, kind: type | tuple[type, ...], *, path: str = "",
            required: bool = True) -> Any:
        """`mapping[field]`, checked to be of `kind` (bool is never accepted as an int)."""
        full = f"{path}.{field}" if path else field
        if field not in mapping or mapping[field] is None:
            if required:
                raise self.fail(full, "missing")
            return None
        value = mapping[field]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if isinstance(value, bool) and bool not in kinds:
            raise self.fail(full, f"expected {_kind_name(kinds)}, got a boolean")
        if not isinstance(value, kinds):
            raise self.fail(full, f"expected {_kind_name(kinds)}, got {type(value).__name__} {value!r}")
        return value

    def strings(self, mapping: Mapping[str, Any], field: str, *, path: str = "", required: bool = True) -> list[str]:
        """A list of strings."""
        items = self.get(mapping, field, list, path=path, required=required) or []
        full = f"{path}.{field}" if path else field
        for i, item in enumerate(items):
            if not isinstance(item, str):
                raise self.fail(f"{full}[{i}]", f"expected a string, got {type(item).__name__} {item!r}")
        return items

    def number(self, mapping: Mapping[str, Any], field: str, *, path: str = "", low: float = 0.0,
               high: float = float("inf"), low_open: bool = True) -> float:
        """A number in (low, high] (or [low, high] with `low_open=False`)."""
        value = self.get(mapping, field, (int, float), path=path)
        if not ((value > low) if low_open else (value >= low)) or value > high:
            bounds = f"{'(' if low_open else '['}{low:g}, {high:g}]"
            raise self.fail(f"{path}.{field}" if path else field, f"must be in {bounds}, got {value!r}")
        return float(value)

    def size(self, mapping: Mapping[str, Any], field: str, *, path: str = "") -> int:
        """A memory size such as `24GiB`."""
        value = self.get(mapping, field, (str, int), path=path)
        try:
            return parse_size(value)
        except InvalidRequestError as exc:
            raise self.fail(f"{path}.{field}" if path else field, str(exc)) from None


def _kind_name(kinds: tuple[type, ...]) -> str:
    names = {dict: "a mapping", list: "a list", str: "a string", int: "an integer", float: "a number"}
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def safe_relative_path(path: str) -> bool:
    """True when `path` is relative and cannot climb out of the directory it is joined to."""
    p = PurePosixPath(path)
    return bool(path) and not p.is_absolute() and ".." not in p.parts and "\\" not in path and ":" not in p.parts[0]


# ----------------------------------------------------------------------------------------------- index.yaml


def validate_index(entries: Any, source: str, *, architectures: Mapping[str, Any], tiers: list[str]) -> None:
    """Check every entry of the gallery index and the links between entries.

    Raises:
        SchemaError: naming the first offending entry and field.
    """
    if not isinstance(entries, list):
        raise Checker(source).fail("(top level)", "expected a list of entries")
    names: dict[str, dict[str, Any]] = {}
    for i, raw in enumerate(entries):
        if not isinstance(raw, dict):
            raise Checker(source, f"#{i}").fail("(entry)", "expected a mapping")
        name = Checker(source, f"#{i}").get(raw, "name", str)
        check = Checker(source, name)
        if not NAME_RE.match(name):
            raise check.fail("name", "use lower-case letters, digits, '.', '_' and '-'")
        if name in names:
            raise check.fail("name", "duplicate entry name")
        names[name] = raw
        _validate_entry(raw, check, architectures, tiers)
    for name, raw in names.items():
        _validate_links(raw, Checker(source, name), names)


def _validate_entry(e: dict[str, Any], check: Checker, architectures: Mapping[str, Any], tiers: list[str]) -> None:
    for field in ("url", "license", "description"):
        check.get(e, field, str)
    check.get(e, "icon", str, required=False)
    check.strings(e, "urls")
    tags = check.strings(e, "tags")
    check.size(e, "size")
    overrides = check.get(e, "overrides", dict)
    check.get(overrides, "backend", str, path="overrides")
    options = check.strings(overrides, "options", path="overrides")
    params = check.get(overrides, "parameters", dict, path="overrides")
    model = check.get(params, "model", str, path="overrides.parameters")
    files = check.get(e, "files", list)
    filenames = [_validate_file(f, check, f"files[{j}]") for j, f in enumerate(files)]
    if model not in filenames:
        raise check.fail("overrides.parameters.model", f"{model!r} is not one of the entry's files {filenames}")
    mmproj = check.get(overrides, "mmproj", str, path="overrides", required=False)
    if mmproj is not None:
        if mmproj not in filenames:
            raise check.fail("overrides.mmproj", f"{mmproj!r} is not one of the entry's files {filenames}")
        if "vision" not in (overrides.get("known_usecases") or ()):
            raise check.fail("overrides.known_usecases", "an entry with an mmproj must list the vision usecase")
    if ("mtp" in tags) != (MTP_OPTION in options):
        raise check.fail("tags", f"tag 'mtp' must be present if and only if options contain {MTP_OPTION!r}")
    apex = check.get(e, "apexmtp", dict)
    _validate_apex_block(apex, check, architectures, tiers, mtp_enabled=MTP_OPTION in options)


def _validate_file(f: Any, check: Checker, path: str) -> str:
    if not isinstance(f, dict):
        raise check.fail(path, "expected a mapping with filename, uri and sha256")
    filename = check.get(f, "filename", str, path=path)
    if not safe_relative_path(filename):
        raise check.fail(f"{path}.filename", f"{filename!r} must be a relative path inside the models directory")
    uri = check.get(f, "uri", str, path=path)
    if not uri.startswith(("huggingface://", "hf://", "https://")):
        raise check.fail(f"{path}.uri", f"{uri!r}: expected huggingface://, hf:// or https://")
    sha = check.get(f, "sha256", str, path=path, required=False)
    if sha is not None and not SHA256_RE.match(sha):
        raise check.fail(f"{path}.sha256", "expected 64 lower-case hex digits")
    return filename


def _validate_apex_block(apex: dict[str, Any], check: Checker, architectures: Mapping[str, Any], tiers: list[str],
                         *, mtp_enabled: bool) -> None:
    p = "apexmtp"
    check.get(apex, "family", str, path=p)
    repo = check.get(apex, "repo", str, path=p)
    if not REPO_RE.match(repo):
        raise check.fail(f"{p}.repo", f"{repo!r} is not owner/name")
    tier = check.get(apex, "tier", str, path=p)
    if tier not in tiers:
        raise check.fail(f"{p}.tier", f"{tier!r} is not one of {tiers} (hardware.yaml policy.tier_order)")
    arch = check.get(apex, "architecture", str, path=p)
    if arch not in architectures:
        raise check.fail(f"{p}.architecture", f"{arch!r} is not in architectures.yaml ({sorted(architectures)})")
    nextn = check.get(apex, "nextn_predict_layers", int, path=p)
    if mtp_enabled and nextn <= 0:
        raise check.fail(f"{p}.nextn_predict_layers", "options enable draft-mtp but the file has no MTP layer")
    sizes = check.get(apex, "bytes", dict, path=p)
    values = {k: check.get(sizes, k, int, path=f"{p}.bytes") for k in BYTES_FIELDS}
    if any(v < 0 for v in values.values()) or values["total"] <= 0:
        raise check.fail(f"{p}.bytes", "byte counts must be non-negative and total positive")
    if values["token_embd"] + values["routed_experts"] + values["mtp"] > values["total"]:
        raise check.fail(f"{p}.bytes", "token_embd + routed_experts + mtp exceed total")
    if (values["mtp"] > 0) != (nextn > 0):
        raise check.fail(f"{p}.bytes.mtp", "must be > 0 exactly when nextn_predict_layers > 0")
    check.get(apex, "kl_mean", (int, float), path=p, required=False)
    check.strings(apex, "provenance", path=p, required=False)


def _validate_links(e: dict[str, Any], check: Checker, names: Mapping[str, dict[str, Any]]) -> None:
    family = e["apexmtp"]["family"]
    if family not in names:
        raise check.fail("apexmtp.family", f"{family!r} is not an entry of the index")
    variants = check.get(e, "variants", list, required=False) or []
    for j, v in enumerate(variants):
        target = check.get(v, "model", str, path=f"variants[{j}]") if isinstance(v, dict) else None
        if target is None:
            raise check.fail(f"variants[{j}]", "expected a mapping {model: <entry name>}")
        if target not in names:
            raise check.fail(f"variants[{j}].model", f"{target!r} is not an entry of the index")
        if names[target].get("variants"):
            raise check.fail(f"variants[{j}].model", f"{target!r} declares variants itself (one level only)")
        if names[target]["apexmtp"]["family"] != family:
            raise check.fail(f"variants[{j}].model", f"{target!r} belongs to family {names[target]['apexmtp']['family']!r}")


# --------------------------------------------------------------------------------------- architectures.yaml


def validate_architectures(data: Any, source: str) -> dict[str, dict[str, Any]]:
    """Check architectures.yaml and return its `architectures` mapping."""
    if not isinstance(data, dict):
        raise Checker(source).fail("(top level)", "expected a mapping with an 'architectures' key")
    archs = Checker(source).get(data, "architectures", dict)
    for name, facts in archs.items():
        check = Checker(source, str(name))
        if not isinstance(facts, dict):
            raise check.fail("(entry)", "expected a mapping of GGUF keys")
        check.get(facts, "general.architecture", str)
        for key in ARCH_INT_KEYS:
            if check.get(facts, key, int) <= 0:
                raise check.fail(key, "must be positive")
        for key in ARCH_OPTIONAL_INT_KEYS:
            check.get(facts, key, int, required=False)
    return archs


# ------------------------------------------------------------------------------------------- hardware.yaml


def validate_hardware(data: Any, source: str) -> Policy:
    """Check hardware.yaml (the selection policy and the hardware classes) and return its policy, typed."""
    top = Checker(source)
    if not isinstance(data, dict):
        raise top.fail("(top level)", "expected a mapping with 'policy' and 'classes'")
    policy = _policy(Checker(source, "policy"), top.get(data, "policy", dict))
    _validate_classes(top.get(data, "classes", list), source)
    return policy


def _policy(pc: Checker, policy: dict[str, Any]) -> Policy:
    tiers = pc.strings(policy, "tier_order")
    if not tiers or len(set(tiers)) != len(tiers):
        raise pc.fail("tier_order", "must list each tier once")
    margin, host_margin = pc.size(policy, "margin"), pc.size(policy, "host_margin")
    counts = {field: pc.get(policy, field, int)
              for field in ("default_context", "n_ubatch", "n_batch", "gpu_layers_all", "checkpoint_min_step")}
    for field, value in counts.items():
        if value <= 0:
            raise pc.fail(field, "must be positive")
    ctx_checkpoints = pc.get(policy, "ctx_checkpoints", int)
    if ctx_checkpoints < 0:
        raise pc.fail("ctx_checkpoints", "must be >= 0")
    candidates = pc.get(policy, "context_candidates", list)
    if not all(isinstance(c, int) and c > 0 for c in candidates):
        raise pc.fail("context_candidates", "expected positive integers")
    cache_type, flash_attention = pc.get(policy, "cache_type", str), pc.get(policy, "flash_attention", str)
    cache_type_cpu = pc.get(policy, "cache_type_cpu", str, required=False) or cache_type
    mtp = pc.get(policy, "mtp", dict)
    mtp_policy = MtpPolicy(spec_n_max=pc.get(mtp, "spec_n_max", int, path="mtp"),
                           spec_p_min=float(pc.get(mtp, "spec_p_min", (int, float), path="mtp")),
                           draft_cache_type=pc.get(mtp, "draft_cache_type", str, path="mtp"))
    default_options = tuple(pc.strings(policy, "default_options"))
    reserve = pc.get(policy, "reserve", dict)
    reserves = Reserve(gpu=pc.size(reserve, "gpu", path="reserve"),
                       ram_fixed=pc.size(reserve, "ram_fixed", path="reserve"),
                       ram_fraction=pc.get(reserve, "ram_fraction", float, path="reserve"))
    bands = tuple(AppleBand(up_to=pc.size(band, "up_to", path=f"apple_working_set[{j}]"),
                            fraction=pc.get(band, "fraction", float, path=f"apple_working_set[{j}]"))
                  for j, band in enumerate(pc.get(policy, "apple_working_set", list)))
    objectives = pc.get(policy, "objectives", dict)
    floor = pc.number(objectives, "floor_tok_s", path="objectives")
    quality_floor = pc.get(objectives, "quality_floor", str, path="objectives")
    if quality_floor not in tiers:
        raise pc.fail("objectives.quality_floor", f"{quality_floor!r} is not in tier_order")
    speed = _speed(pc, pc.get(policy, "speed", dict))
    return Policy(tier_order=tuple(tiers), margin=margin, host_margin=host_margin, **counts,
                  ctx_checkpoints=ctx_checkpoints, context_candidates=tuple(candidates), cache_type=cache_type,
                  cache_type_cpu=cache_type_cpu, flash_attention=flash_attention, mtp=mtp_policy, default_options=default_options, reserve=reserves,
                  apple_working_set=bands, objectives=Objectives(floor_tok_s=floor, quality_floor=quality_floor),
                  speed=speed, gpu_builds=_gpu_builds(pc, pc.get(policy, "gpu_builds", dict)))


def _gpu_builds(pc: Checker, builds: dict[str, Any]) -> GpuBuilds:
    command = pc.get(builds, "command", str, path="gpu_builds")
    if "{flags}" not in command:
        raise pc.fail("gpu_builds.command", "must contain {flags}")
    vendors = pc.get(builds, "vendors", dict, path="gpu_builds")
    if "default" not in vendors:
        raise pc.fail("gpu_builds.vendors", "needs a 'default' entry")
    return GpuBuilds(command=command, vendors={
        vendor: GpuBuild(**{field: pc.get(row, field, str, path=f"gpu_builds.vendors.{vendor}")
                            for field in ("flags", "backend", "needs")})
        for vendor, row in vendors.items()})


def _speed(pc: Checker, speed: dict[str, Any]) -> SpeedPolicy:
    at_context = pc.get(speed, "at_context", int, path="speed")
    if at_context <= 0:
        raise pc.fail("speed.at_context", "must be positive")
    token_ms = pc.number(speed, "token_overhead_ms", path="speed", low_open=False)
    rpc_ms = pc.number(speed, "rpc_token_overhead_ms", path="speed", low_open=False)
    devices = pc.get(speed, "devices", dict, path="speed")
    kinds: dict[str, DeviceSpeed] = {}
    for kind in ("gpu", "unified", "cpu"):
        consts = pc.get(devices, kind, dict, path="speed.devices")
        where = f"speed.devices.{kind}"
        kinds[kind] = DeviceSpeed(efficiency=pc.number(consts, "efficiency", path=where, high=1.0),
                                  layer_overhead_ms=pc.number(consts, "layer_overhead_ms", path=where, low_open=False),
                                  verify_overhead=pc.number(consts, "verify_overhead", path=where, low_open=False),
                                  quant_cost=pc.number(consts, "quant_cost", path=where))
    acc = pc.get(speed, "mtp_acceptance", dict, path="speed")
    rate = pc.number(acc, "rate", path="speed.mtp_acceptance", high=1.0)
    n_draft = pc.get(acc, "n_draft", int, path="speed.mtp_acceptance")
    if n_draft < 1:
        raise pc.fail("speed.mtp_acceptance.n_draft", "must be >= 1")
    ram_gbps = pc.number(speed, "ram_gbps", path="speed")
    rows: list[GpuBandwidth] = []
    for j, row in enumerate(pc.get(speed, "gpu_gbps", list, path="speed")):
        where = f"speed.gpu_gbps[{j}]"
        match = pc.get(row, "match", str, path=where)
        try:
            re.compile(match)
        except re.error as exc:
            raise pc.fail(f"{where}.match", f"not a regular expression: {exc}") from None
        rows.append(GpuBandwidth(match=match, gbps=pc.number(row, "gbps", path=where)))
    vendor_gbps = pc.get(speed, "vendor_gbps", dict, path="speed")
    vendors = {vendor: pc.number(vendor_gbps, vendor, path="speed.vendor_gbps") for vendor in vendor_gbps}
    if "default" not in vendor_gbps:
        raise pc.fail("speed.vendor_gbps", "needs a 'default' entry")
    return SpeedPolicy(at_context=at_context, token_overhead_ms=token_ms, rpc_token_overhead_ms=rpc_ms,
                       devices=kinds, mtp_acceptance=Acceptance(rate=rate, n_draft=n_draft), ram_gbps=ram_gbps,
                       gpu_gbps=tuple(rows), vendor_gbps=vendors)


def _validate_classes(classes: list[Any], source: str) -> None:
    seen: set[str] = set()
    needs: dict[str, Callable[[Checker, dict[str, Any]], Any]] = {
        "cpu": lambda c, d: (c.size(d, "ram"), c.number(d, "ram_gbps")),
        "gpu": lambda c, d: (c.size(d, "ram"), c.size(d, "vram"), c.number(d, "ram_gbps"), c.number(d, "vram_gbps")),
        "apple": lambda c, d: (c.size(d, "ram"), c.number(d, "ram_gbps")),
    }
    for j, cls in enumerate(classes):
        if not isinstance(cls, dict):
            raise Checker(source, f"classes[{j}]").fail("(entry)", "expected a mapping")
        name = Checker(source, f"classes[{j}]").get(cls, "name", str)
        check = Checker(source, name)
        if name in seen:
            raise check.fail("name", "duplicate class name")
        seen.add(name)
        kind = check.get(cls, "kind", str)
        if kind not in needs:
            raise check.fail("kind", f"{kind!r} is not one of {sorted(needs)}")
        needs[kind](check, cls)
        check.get(cls, "description", str)
