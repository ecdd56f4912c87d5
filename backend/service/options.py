"""LocalAI `ModelOptions` -> what the engine needs, with one documented precedence.

Typed proto fields come first; `Options` strings (`key:value`, a bare key means true) override them. The option
vocabulary is data (`localai_options.yaml`): every name LocalAI's llama-cpp backend reads is honoured with its
meaning there, refused with a message naming it, or — where it cannot change what this engine computes —
accepted with a WARNING naming it. A name outside that vocabulary close to one of its names is a typo ("did you
mean"); any other is skipped with a warning, because LocalAI passes one option bag to every backend. The README's
vocabulary table is written from the same file (`vocabulary_table`).
"""

from __future__ import annotations

import difflib
import functools
import logging
import math
import textwrap
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import yaml

from ..core import constants
from ..core.endpoints import parse_endpoints
from ..core.errors import InvalidOptionError, ModelNotFoundError
from ..core.gguf_file import GGUFInfo, read_gguf
from ..core.parse import parse_bool
from ..core.units import MiB
from ..engine.llama import EngineConfig, KVOverride, check_placement
from ..engine.ngram import NGRAM_TYPES
from ..engine.prompt_cache import CacheConfig
from ..engine.speculative import SpecConfig
from ..rpc.client import parse_tensor_split

log = logging.getLogger(__name__)

DEFAULT_CONTEXT = 4096  # LocalAI's DefaultContextSize
DEFAULT_N_MAX = 6  # LocalAI's gallery default for draft-mtp (spec_n_max:6)
VOCABULARY_FILE = Path(__file__).with_name("localai_options.yaml")
STATUSES = ("honoured", "warned", "refused")
# llama.cpp's speculative types (common/speculative.cpp): those this backend runs and those it refuses.
MODEL_DRAFTERS = ("draft-mtp", "draft-simple")  # drafting with a model: the GGUF's MTP head, or DraftModel
SPEC_TYPES = ("none", *MODEL_DRAFTERS, *NGRAM_TYPES)
UNSUPPORTED_SPEC_TYPES = ("draft-eagle3", "draft-dflash", "draft-dspark", "ngram-map-k",
                          "ngram-map-k4v", "ngram-cache")
_SPEC_ALIASES = {"draft": "draft-simple", "eagle3": "draft-eagle3"}  # LocalAI's normalisation
CACHE_FIELDS = ("n_checkpoints", "min_step", "ram_mib", "idle_slots", "similarity", "disk_dir", "disk_mib",
                "disk_min_tokens")
NGRAM_FIELDS = ("ngram_size_n", "ngram_size_m", "ngram_mod_n_min", "ngram_mod_n_max", "ngram_mod_n_match")
KV_OVERRIDE_TYPES = ("int", "float", "bool", "str")


# ------------------------------------------------------------------------------------------- value parsers


def _bool(v: str) -> bool:
    return parse_bool(v, empty=True)  # a bare key (`use_jinja`, `use_jinja:`) switches the option on


def _int(v: str) -> int:
    try:
        return int(v)
    except ValueError:
        raise ValueError(f"expected an integer, got {v!r}") from None


def _prob(v: str) -> float:
    x = float(v)
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"must be in [0, 1], got {x}")
    return x


def _nonneg_int(v: str) -> int:
    x = _int(v)
    if x < 0:
        raise ValueError(f"must be >= 0, got {x}")
    return x


def _positive_int(v: str) -> int:
    x = _int(v)
    if x < 1:
        raise ValueError(f"must be >= 1, got {x}")
    return x


def _cache_mib(v: str) -> int:
    x = _int(v)
    if x < -1:
        raise ValueError(f"must be -1 (no limit), 0 (off) or a size in MiB, got {x}")
    return x


def _directory(v: str) -> str:
    return str(Path(v.strip()).expanduser())


def _names(v: str) -> tuple[str, ...]:
    return tuple(n.strip() for n in v.split(",") if n.strip())


def _spec_types(v: str) -> tuple[str, ...]:
    """LocalAI's normalisation of a `spec_type` list: `_` -> `-`, `draft` -> draft-simple, `eagle3` -> draft-eagle3."""
    names = [n.replace("_", "-") for n in _names(v)]
    names = [_SPEC_ALIASES.get(n, n) for n in names]
    unknown = [n for n in names if n not in SPEC_TYPES + UNSUPPORTED_SPEC_TYPES]
    if unknown or not names:
        raise ValueError(f"unknown speculative type(s) {', '.join(unknown) or v!r}; "
                         f"llama.cpp's are {', '.join(SPEC_TYPES + UNSUPPORTED_SPEC_TYPES)}")
    unsupported = [n for n in names if n in UNSUPPORTED_SPEC_TYPES]
    if unsupported:
        raise ValueError(f"{', '.join(unsupported)} is not supported yet (this backend drafts with "
                         f"{', '.join(MODEL_DRAFTERS)}, {' and '.join(NGRAM_TYPES)}, alone or chained)")
    return tuple(dict.fromkeys(names))


def _tensor_overrides(v: str) -> tuple[tuple[str, str], ...]:
    """`<tensor regex>=<buffer type>,...` (llama-server's --override-tensor) -> ((regex, buffer type), ...)."""
    out = []
    for item in _names(v):
        pattern, sep, buft = item.partition("=")
        if not sep or not pattern or not buft:
            raise ValueError(f"{item!r} is not <tensor regex>=<buffer type>")
        out.append((pattern, buft))
    return tuple(out)


PARSERS: dict[str, Callable[[str], Any]] = {
    "bool": _bool, "int": _int, "nonneg_int": _nonneg_int, "positive_int": _positive_int, "prob": _prob,
    "cache_mib": _cache_mib, "directory": _directory, "names": _names, "text": str, "spec_types": _spec_types,
    "endpoints": parse_endpoints, "tensor_split": parse_tensor_split, "tensor_overrides": _tensor_overrides,
}


def _choice(v: str, choices: tuple[str, ...]) -> str:
    s = v.strip().lower()
    if s not in choices:
        raise ValueError(f"one of {', '.join(choices)}, not {v!r}")
    return s.replace("_", "-")


# ------------------------------------------------------------------------------------------- the vocabulary


@dataclass(frozen=True)
class OptionSpec:
    """One option of `localai_options.yaml` (see the file's header for the keys)."""

    name: str
    aliases: tuple[str, ...]
    field: str | None
    parse: Callable[[str], Any]
    status: str
    only: tuple[Any, ...] | None
    otherwise: str
    note: str
    source: str

    @property
    def names(self) -> tuple[str, ...]:
        return (self.name, *self.aliases)

    @property
    def status_text(self) -> str:
        """How the README states it: the status, and what happens to the other values."""
        if self.only is None:
            return self.status
        values = ", ".join(f"`{str(v).lower()}`" for v in self.only)
        return f"{self.status} ({values}); other values {self.otherwise}"


@dataclass(frozen=True)
class FieldSpec:
    """A typed ModelOptions field of `localai_options.yaml`."""

    name: str
    status: str
    note: str


@dataclass(frozen=True)
class Vocabulary:
    options: tuple[OptionSpec, ...]
    fields: tuple[FieldSpec, ...]
    readme: str  # the README section's opening paragraph

    @functools.cached_property
    def by_name(self) -> dict[str, OptionSpec]:
        return {name: spec for spec in self.options for name in spec.names}


def _option(name: str, raw: dict[str, Any]) -> OptionSpec:
    kind = raw["parse"]
    parse = functools.partial(_choice, choices=tuple(raw["choices"])) if kind == "choice" else PARSERS[kind]
    only = raw.get("only")
    spec = OptionSpec(name=name, aliases=tuple(raw.get("aliases", ())), field=raw.get("field"), parse=parse,
                      status=raw["status"], only=None if only is None else tuple(only if isinstance(only, list) else [only]),
                      otherwise=raw.get("otherwise", ""), note=" ".join(str(raw.get("note", "")).split()),
                      source=raw.get("source", "localai"))
    if spec.status not in STATUSES or (spec.only is not None and spec.otherwise not in STATUSES[1:]):
        raise ValueError(f"{VOCABULARY_FILE}: option {name}: bad status {spec.status!r} / {spec.otherwise!r}")
    return spec


@functools.cache
def vocabulary() -> Vocabulary:
    """The parsed `localai_options.yaml` (names are checked to be unique across entries)."""
    data = yaml.safe_load(VOCABULARY_FILE.read_text())
    vocab = Vocabulary(options=tuple(_option(name, raw) for name, raw in data["options"].items()),
                       fields=tuple(FieldSpec(name, raw["status"], " ".join(raw["note"].split()))
                                    for name, raw in data["fields"].items()),
                       readme=" ".join(data["readme"].split()))
    names = [n for spec in vocab.options for n in spec.names]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes or any(f.status not in STATUSES for f in vocab.fields):
        raise ValueError(f"{VOCABULARY_FILE}: names listed twice {dupes}, or a field with a bad status")
    return vocab


README_MARKERS = ("<!-- options-table -->", "<!-- /options-table -->")


def vocabulary_table() -> str:
    """The README's "LocalAI option vocabulary" section (between `README_MARKERS`), from `localai_options.yaml`."""
    vocab = vocabulary()
    lines = ["### LocalAI option vocabulary", "", textwrap.fill(vocab.readme, 116), "",
             "| Option | Also | Here | Notes |", "|---|---|---|---|"]
    for spec in vocab.options:
        also = ", ".join(f"`{a}`" for a in spec.aliases)
        ours = " (apexmtp's own)" if spec.source == "apexmtp" else ""
        lines.append(f"| `{spec.name}`{ours} | {also} | {spec.status_text} | {spec.note} |")
    lines += ["", "| ModelOptions field | Here | Notes |", "|---|---|---|"]
    lines += [f"| `{f.name}` | {f.status} | {f.note} |" for f in vocab.fields]
    return "\n".join(lines) + "\n"


def parse_options(options: list[str]) -> dict[str, Any]:
    """`["spec_type:draft-mtp", "spec_n_max:6", "use_jinja"]` -> `{"spec_type": ("draft-mtp",), "n_max": 6, ...}`.

    Keys are the vocabulary's `field`s; a later entry wins over an earlier one. A refused option or a bad value
    raises `InvalidOptionError` naming it; a warned one, or a value this engine does not honour but that cannot
    change its output, is logged at WARNING.
    """
    by_name = vocabulary().by_name
    out: dict[str, Any] = {}
    for raw in options:
        name, _, value = raw.partition(":")
        passthrough = name.strip().startswith("-")  # a llama-server flag LocalAI would hand to its parser
        key, value = name.strip().lstrip("-").replace("-", "_"), value.strip()
        spec = by_name.get(key)
        if spec is None:
            close = None if passthrough else difflib.get_close_matches(key, by_name, n=1, cutoff=0.8)
            if close:
                raise InvalidOptionError(f"unknown option {key!r} (did you mean {close[0]!r}?)")
            log.warning("option %r is not read by this backend: ignored", raw)
            continue
        if spec.status == "refused":
            raise InvalidOptionError(f"option {key} is not supported: {spec.note}")
        if not value and spec.parse is not _bool:  # LocalAI reads these only when they have a value
            log.info("option %r has no value: left at its default", raw)
            continue
        try:
            parsed = spec.parse(value)
        except ValueError as exc:
            raise InvalidOptionError(f"option {key}: {exc}") from None
        if spec.status == "warned":
            log.warning("option %r accepted but has no effect here: %s", raw, spec.note)
        elif spec.only is not None and parsed not in spec.only:
            if spec.otherwise == "refused":
                raise InvalidOptionError(f"option {key}:{value} is not supported: {spec.note}")
            log.warning("option %r is not honoured here: %s", raw, spec.note)
        elif spec.field:
            out[spec.field] = parsed
    return out


def check_fields(req: Any) -> None:
    """Refuse or warn about the typed ModelOptions fields the vocabulary marks so, when they are set."""
    for f in vocabulary().fields:
        if f.status == "honoured" or not getattr(req, f.name, None):
            continue
        if f.status == "refused":
            raise InvalidOptionError(f"ModelOptions.{f.name} is not supported: {f.note}")
        log.warning("ModelOptions.%s is set but has no effect here: %s", f.name, f.note)


# ------------------------------------------------------------------------------------------- typed fields


def parse_kv_override(entry: str, info: GGUFInfo | None = None) -> KVOverride:
    """`key=type:value` (llama.cpp's --override-kv; type int, float, bool or str) -> KVOverride.

    Raises:
        InvalidOptionError: malformed, naming the entry (llama.cpp would skip it with a log line).
    """
    key, sep, typed = entry.partition("=")
    kind, colon, text = typed.partition(":")
    bad = f"Overrides entry {entry!r}"
    if not sep or not key or not colon or kind not in KV_OVERRIDE_TYPES:
        raise InvalidOptionError(f"{bad} is not key=type:value with type one of {', '.join(KV_OVERRIDE_TYPES)}")
    if len(key.encode()) >= 128 or len(text.encode()) >= 128:
        raise InvalidOptionError(f"{bad}: keys and string values are at most 127 bytes")
    parsers: dict[str, Callable[[str], Any]] = {"int": int, "float": float, "str": str, "bool": _strict_bool}
    try:
        value: Any = parsers[kind](text)
    except ValueError:
        raise InvalidOptionError(f"{bad}: {text!r} is not a {kind}") from None
    stored = info.metadata.get(key) if info is not None else None
    if stored is not None and _override_type(stored) != kind:
        raise InvalidOptionError(f"{bad}: the GGUF stores {key} as {_override_type(stored)}, not {kind}")
    return KVOverride(key, kind, value)


def _strict_bool(text: str) -> bool:
    if text not in ("true", "false"):  # llama.cpp's own rule
        raise ValueError(text)
    return text == "true"


def _override_type(value: Any) -> str:
    return {bool: "bool", int: "int", float: "float", str: "str"}.get(type(value), "an array")


def resolve_model_path(model: str, model_file: str, model_path: str) -> Path:
    """LocalAI sends ModelFile (absolute) and Model (relative to ModelPath); prefer the file that exists."""
    candidates = [Path(model_file)] if model_file else []
    if model:
        p = Path(model)
        candidates.append(p if p.is_absolute() or not model_path else Path(model_path) / p)
    for c in candidates:
        if c.exists():
            return c
    if not candidates:
        raise ModelNotFoundError("", hint="LoadModel needs Model or ModelFile")
    raise ModelNotFoundError(candidates[0], hint=f"also looked for {candidates[-1]}" if len(candidates) > 1 else "")


def resolve_companion(name: str, model_path: str, what: str) -> Path:
    """A file beside the model (MMProj, a LoRA adapter): absolute, or relative to ModelPath like Model; it must
    exist."""
    p = Path(name)
    if not p.is_absolute() and model_path:
        p = Path(model_path) / p
    if not p.is_file():
        raise ModelNotFoundError(p, hint=f"{what}")
    return p


def _loras(req: Any) -> tuple[tuple[str, float], ...]:
    """LoraAdapter (with LoraScale, default 1) and LoraAdapters (with LoraScales), as (path, scale)."""
    pairs = [(req.LoraAdapter, req.LoraScale or 1.0)] if req.LoraAdapter else []
    scales = list(req.LoraScales)
    if len(scales) > len(req.LoraAdapters):
        raise InvalidOptionError(f"LoraScales has {len(scales)} entries for {len(req.LoraAdapters)} LoraAdapters")
    pairs += [(a, scales[i] if i < len(scales) else 1.0) for i, a in enumerate(req.LoraAdapters)]
    for _, scale in pairs:
        if not math.isfinite(scale):
            raise InvalidOptionError(f"LoRA scale {scale} is not a finite number")
    return tuple((str(resolve_companion(a, req.ModelPath, "a LoRA adapter GGUF (LoraAdapter)")), float(s))
                 for a, s in pairs)


ROPE_SCALINGS = ("none", "linear", "yarn")
_YARN_FIELDS = {"yarn_ext_factor": "YarnExtFactor", "yarn_attn_factor": "YarnAttnFactor",
                "yarn_beta_fast": "YarnBetaFast", "yarn_beta_slow": "YarnBetaSlow"}


def _rope(req: Any) -> dict[str, Any]:
    """The RoPE/YaRN typed fields as EngineConfig fields (0 or empty: the model's own, as in LocalAI)."""
    scaling = req.RopeScaling.strip().lower()
    if scaling and scaling not in ROPE_SCALINGS:
        raise InvalidOptionError(f"RopeScaling must be one of {', '.join(ROPE_SCALINGS)}, not {req.RopeScaling!r}")
    out: dict[str, Any] = {"rope_scaling": scaling}
    for name, value in (("RopeFreqBase", req.RopeFreqBase), ("RopeFreqScale", req.RopeFreqScale),
                        *((f, getattr(req, f)) for f in _YARN_FIELDS.values())):
        if value and (not math.isfinite(value) or value < 0):
            raise InvalidOptionError(f"{name} must be a positive number, not {value}")
    if req.YarnExtFactor > 1:
        raise InvalidOptionError(f"YarnExtFactor is a mix factor in [0, 1], not {req.YarnExtFactor}")
    if req.YarnBetaFast and req.YarnBetaSlow and req.YarnBetaFast <= req.YarnBetaSlow:
        raise InvalidOptionError(f"YarnBetaFast ({req.YarnBetaFast}) must exceed YarnBetaSlow ({req.YarnBetaSlow})")
    out["rope_freq_base"], out["rope_freq_scale"] = float(req.RopeFreqBase), float(req.RopeFreqScale)
    out.update({f: float(getattr(req, name)) if getattr(req, name) else None for f, name in _YARN_FIELDS.items()})
    return out


def _warn_beyond_training(n_ctx: int, rope: dict[str, Any], info: GGUFInfo) -> None:
    """A slot longer than the model's training context with no RoPE scaling, from the request or the GGUF, is
    likely to degrade past the trained length: say so."""
    trained = int(info.arch_key("context_length", 0) or 0)
    scaled = rope["rope_scaling"] in ("linear", "yarn") or 0 < rope["rope_freq_scale"] < 1 or (
        rope["rope_scaling"] != "none" and str(info.arch_key("rope.scaling.type", "none")) not in ("none", ""))
    if trained and n_ctx > trained and not scaled:
        log.warning("ContextSize %d is beyond the model's training context (%s.context_length = %d) and no RoPE "
                    "scaling is set: quality may degrade past %d tokens (set RopeScaling yarn or linear with "
                    "RopeFreqScale %.3g)", n_ctx, info.architecture, trained, trained, trained / n_ctx)


def _main_gpu(text: str) -> int:
    try:
        gpu = int(text) if text.strip() else 0
    except ValueError:
        raise InvalidOptionError(f"MainGPU must be a GPU index, not {text!r}") from None
    if gpu < 0:
        raise InvalidOptionError(f"MainGPU must be a GPU index >= 0, not {gpu}")
    return gpu


# ------------------------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class LoadPlan:
    """Everything LoadModel decided: the file, engine settings, speculation and template use."""

    path: Path
    engine: EngineConfig
    spec: SpecConfig
    use_jinja: bool
    mtp_reason: str  # why MTP is on or off, for the log and Status
    identity: str = ""  # ModelOptions.Model: requests naming another ModelIdentity are refused
    grammar_triggers: tuple[str, ...] = ()  # ModelOptions.GrammarTriggers words: a request's Grammar waits for one
    image_limit: int = 0  # ModelOptions.LimitImagePerPrompt: most images one request may carry (0: no limit)
    cache: CacheConfig = CacheConfig()  # checkpoints and prompt caches
    reasoning: int = -1  # reasoning_budget: -1 the template's default, 0 enable_thinking off, 1 on
    prefill_assistant: bool = True  # continue a trailing assistant message (llama-server's default)
    draft_path: Path | None = None  # DraftModel: the GGUF that drafts for the model (draft-simple)
    draft: EngineConfig | None = None  # its settings


def _speculation(opts: dict[str, Any], info: GGUFInfo, draft_model: bool) -> tuple[str, int, str]:
    """(the model that drafts: "draft-mtp", "draft-simple" or "", n_max, why), as LocalAI decides it: a GGUF with a
    head drafts with it unless spec_type says otherwise, and a DraftModel adds draft-simple. One model drafts per
    slot: the first of the two listed."""
    types = opts.get("spec_type", ("draft-simple",) if draft_model else
                     ("draft-mtp",) if info.has_mtp_head else ("none",))
    if draft_model and "draft-simple" not in types:
        types = (*types, "draft-simple")
    if "draft-simple" in types and not draft_model:
        raise InvalidOptionError("spec_type draft-simple needs DraftModel: a GGUF of the model's vocabulary")
    n_max = opts.get("n_max", DEFAULT_N_MAX)
    drafter = next((t for t in types if t in MODEL_DRAFTERS), "")
    if not drafter:
        return "", 0, f"spec_type {','.join(types)}: no draft model, decoding plainly"
    if sum(t in MODEL_DRAFTERS for t in types) > 1:
        log.warning("spec_type %s: one model drafts per slot; %s is used", ",".join(types), drafter)
    if drafter == "draft-mtp" and not info.has_mtp_head:
        return "", 0, "MTP requested but the GGUF has no MTP head: decoding plainly"
    if n_max == 0:
        return "", 0, "spec_n_max is 0: decoding plainly"
    what = "MTP self-speculation" if drafter == "draft-mtp" else "draft-model speculation"
    return drafter, min(n_max, 16), f"{what} on (n_max={n_max}, adaptive={opts.get('adaptive', True)})"


def _draft_engine(opts: dict[str, Any], target: EngineConfig) -> EngineConfig:
    """The draft model's settings: the target's context, slots and batch, its own placement, threads and KV types
    where `draft_*` options give them (RoPE scaling as the target's: it reads the same positions). The scheduler's
    thread governor drives both models' threads; the draft stays on local devices."""
    threads = opts.get("draft_threads", 0)
    gpu_layers = opts.get("draft_gpu_layers", -1)
    # Own threads: batch threads are draft_threads_batch, else (0) draft_threads; otherwise the target's.
    own_threads = threads > 0 or "draft_threads_batch" in opts
    return replace(
        target, n_threads=threads if threads > 0 else target.n_threads,
        n_threads_batch=max(opts.get("draft_threads_batch", 0), 0) if own_threads else target.n_threads_batch,
        n_gpu_layers=target.n_gpu_layers if gpu_layers < 0 else gpu_layers,
        type_k=opts.get("draft_type_k", "f16").lower(), type_v=opts.get("draft_type_v", "f16").lower(),
        n_cpu_moe=-1 if opts.get("draft_cpu_moe") else opts.get("draft_n_cpu_moe", 0),
        tensor_overrides=opts.get("draft_tensor_overrides", ()),
        mtp=False, n_draft_max=0, n_rs_seq=None, embeddings=False, reranking=False, lora=(), kv_overrides=(),
        mmproj="", warmup=False, adaptive_threads=False, rpc_servers=(), tensor_split=())


def plan_load(req: Any, info: GGUFInfo, path: Path) -> LoadPlan:
    """Turn a `ModelOptions` message and the file's header into a `LoadPlan`."""
    opts = parse_options(list(req.Options))
    check_fields(req)
    drafter, n_max, reason = _speculation(opts, info, bool(req.DraftModel))
    mtp, model_drafts = drafter == "draft-mtp", bool(drafter)
    spec_types = opts.get("spec_type", ())
    ngram = next((t for t in spec_types if t in NGRAM_TYPES), "")  # one n-gram type per chain (llama.cpp's first)
    spec = SpecConfig(n_max=n_max, n_min=opts.get("n_min", 0), p_min=opts.get("p_min", 0.0),
                      adaptive=opts.get("adaptive", True), ngram=ngram,
                      **{k: opts[k] for k in NGRAM_FIELDS if k in opts})
    if ngram:
        reason = f"{ngram} drafting on (up to {spec.ngram_max} tokens), then " + (
            reason if any(t in MODEL_DRAFTERS for t in spec_types) else "plain decoding where it finds no match")
    rerank = req.Reranking or opts.get("pooling") == "rank"
    if rerank and not info.has_rank_head:
        raise InvalidOptionError(f"{path.name} has no reranking head (no cls / cls.output tensor): Reranking needs "
                                 "a reranker GGUF")
    n_batch = req.NBatch if req.NBatch > 0 else 512
    n_ctx = req.ContextSize if req.ContextSize > 0 else DEFAULT_CONTEXT
    rope = _rope(req)
    _warn_beyond_training(n_ctx, rope, info)
    cfg = EngineConfig(
        n_ctx=n_ctx,
        n_seq=opts.get("parallel", constants.LLAMACPP_PARALLEL),
        n_batch=n_batch,
        n_ubatch=opts.get("n_ubatch") or n_batch,
        n_threads=req.Threads if req.Threads > 0 else 0,
        n_threads_batch=max(opts.get("threads_batch", 0), 0),
        adaptive_threads=opts.get("adaptive_threads", True),
        n_gpu_layers=-1 if req.NGPULayers >= 9_999_999 else req.NGPULayers,
        use_mmap=req.MMap,
        use_mlock=req.MLock,
        direct_io=opts.get("direct_io", False),
        flash_attn=_flash(req.FlashAttention),
        type_k=(req.CacheTypeKey or "f16").lower(),
        type_v=(req.CacheTypeValue or "f16").lower(),
        mtp=mtp,
        n_draft_max=spec.n_draft_max(model_drafts),
        n_rs_seq=spec.n_rs_seq(model_drafts),
        embeddings=req.Embeddings,
        pooling="mean" if rerank else opts.get("pooling", "mean"),
        embd_normalize=opts.get("embd_normalize", 2),
        reranking=rerank,
        n_cpu_moe=-1 if opts.get("cpu_moe") else opts.get("n_cpu_moe", 0),
        rpc_servers=opts.get("rpc_servers", constants.RPC_SERVERS),
        tensor_split=opts.get("tensor_split") or (parse_tensor_split(req.TensorSplit) if req.TensorSplit else ()),
        split_mode=opts.get("split_mode", "layer"),
        main_gpu=_main_gpu(req.MainGPU),
        devices=opts.get("devices"),
        tensor_overrides=opts.get("tensor_overrides", ()),
        offload_kqv=not req.NoKVOffload,
        op_offload=not opts.get("no_op_offload", False),
        swa_full=opts.get("swa_full", False),
        kv_unified=opts.get("kv_unified", False),
        check_tensors=opts.get("check_tensors", False),
        warmup=opts.get("warmup", False),
        kv_overrides=tuple(parse_kv_override(o, info) for o in req.Overrides if o.strip()),
        lora=_loras(req),
        mmproj=str(resolve_companion(req.MMProj, req.ModelPath, "MMProj names the vision projector file"))
        if req.MMProj else "",
        mmproj_offload=opts.get("mmproj_offload", True),
        image_min_tokens=opts.get("image_min_tokens", -1),
        image_max_tokens=opts.get("image_max_tokens", -1),
        **rope,
    )
    cache = CacheConfig(**{k: opts[k] for k in CACHE_FIELDS if k in opts})
    if opts.get("fit_params", True):
        cfg = _fit(cfg, req, info, opts, cache)
    check_placement(cfg, info.trunk_layers)
    if cfg.n_gpu_layers != 0 and not cfg.rpc_servers:  # with workers, the offloaded layers go to their devices
        _warn_if_cpu_only(req.NGPULayers)
    draft_path = resolve_companion(req.DraftModel, req.ModelPath, "DraftModel names the draft model GGUF") \
        if drafter == "draft-simple" else None
    if draft_path is not None:
        read_gguf(draft_path)  # a corrupt or truncated file is refused here, before llama.cpp reads it
    return LoadPlan(path=path, engine=cfg, spec=spec, draft_path=draft_path,
                    draft=_draft_engine(opts, cfg) if draft_path is not None else None,
                    use_jinja=opts.get("use_jinja", True), mtp_reason=reason,
                    identity=req.Model, grammar_triggers=tuple(t.word for t in req.GrammarTriggers if t.word),
                    image_limit=max(req.LimitImagePerPrompt, 0),
                    cache=cache,
                    reasoning=opts.get("reasoning", -1), prefill_assistant=opts.get("prefill_assistant", True))


def _fit(cfg: EngineConfig, req: Any, info: GGUFInfo, opts: dict[str, Any], cache: CacheConfig) -> EngineConfig:
    """llama.cpp's fit_params with the gallery's memory model (gallery.fit): the context when ContextSize is unset,
    then routed experts to RAM when no expert placement is given; logged. Not with RPC workers (the gallery's
    split plan places those) nor a partial NGPULayers (the memory model places whole modes)."""
    all_layers = cfg.n_gpu_layers < 0 or cfg.n_gpu_layers > info.trunk_layers
    if cfg.rpc_servers or (cfg.n_gpu_layers != 0 and not all_layers):
        log.info("fit_params: not fitting %s (%s)", req.Model or info.architecture,
                 "RPC workers" if cfg.rpc_servers else f"NGPULayers {cfg.n_gpu_layers} given")
        return cfg
    from gallery.catalog import load_catalog
    from gallery.detect import detect
    from gallery.estimate import ArchFacts, RunConfig, weights_from_gguf
    from gallery.fit import FitRequest, fit
    from gallery.select import budget_for

    policy = load_catalog().policy
    arch = ArchFacts.from_gguf(info)
    run = RunConfig(n_ctx=cfg.n_ctx, n_ubatch=cfg.batch_sizes[1], n_seq=cfg.n_seq, cache_type_k=cfg.type_k,
                    cache_type_v=cfg.type_v, mtp=cfg.mtp, spec_n_max=cfg.rollback_depth if cfg.mtp else 0,
                    mmproj_bytes=Path(cfg.mmproj).stat().st_size if cfg.mmproj else 0,
                    n_checkpoints=cache.n_checkpoints, checkpoint_min_step=cache.min_step)
    experts_given = any(k in opts for k in ("cpu_moe", "n_cpu_moe", "tensor_overrides"))
    budget = budget_for(detect(bandwidth=False), policy)
    got = fit(arch, weights_from_gguf(info, arch), budget, policy,
              FitRequest(run, gpu=cfg.n_gpu_layers != 0, ctx_free=req.ContextSize <= 0, experts_free=not experts_given,
                         min_ctx=opts.get("fit_min_ctx", 4096), target=opts.get("fit_target", 1024) * MiB))
    where = (f"{budget.gpu_label}: {budget.gpu_free >> 20} MiB free, " if budget.gpu else "") + \
        f"RAM: {budget.ram_free >> 20} MiB free"
    if not got.fits:
        log.warning("fit_params: %s does not fit this machine as configured (needs %d MiB on the GPU and %d MiB of "
                    "RAM; %s): loading anyway", req.Model or info.architecture, got.device_need >> 20,
                    got.host_need >> 20, where)
    for change in got.changes:
        log.info("fit_params: %s (%s)", change, where)
    return replace(cfg, n_ctx=got.n_ctx, n_cpu_moe=got.n_cpu_moe if got.mode == "gpu+ram" else cfg.n_cpu_moe)


def _warn_if_cpu_only(n_gpu_layers: int) -> None:
    """GPU layers asked of a build with no GPU (local or RPC): llama.cpp would silently run everything on the CPU,
    so say so, with the reinstall command for the GPU this machine has (gallery.builds)."""
    from ..engine.devices import build_info

    try:
        cpu_only = build_info().cpu_only
    except (OSError, AttributeError) as exc:  # a llama.cpp without the registry API: nothing to tell
        log.debug("could not read the llama.cpp build: %s", exc)
        return
    if cpu_only:
        from gallery.builds import warn_cpu_only_load

        warn_cpu_only_load(n_gpu_layers)


def _flash(value: str) -> str:
    v = (value or "auto").strip().lower()
    try:
        return "on" if parse_bool(v) else "off"
    except ValueError:  # auto, or a word the engine refuses naming the choices
        return v


if __name__ == "__main__":  # `python -m backend.service.options`: the README table
    print(vocabulary_table(), end="")
