"""LocalAI `ModelOptions` -> what the engine needs, with one documented precedence.

Typed proto fields come first; `Options` strings (`key:value`, a bare key means true) override them. Keys
this backend owns are validated strictly (a typo gets a "did you mean"); unknown keys are logged and skipped,
because LocalAI passes one option bag to every backend.
"""

from __future__ import annotations

import difflib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .. import constants
from ..engine.llama import EngineConfig
from ..engine.prompt_cache import CacheConfig
from ..errors import InvalidOptionError, ModelNotFoundError
from ..gguf_file import GGUFInfo
from ..rpc.client import parse_tensor_split
from ..rpc.protocol import parse_endpoints
from ..engine.ngram import NGRAM_TYPES
from ..engine.speculative import SpecConfig

log = logging.getLogger(__name__)

DEFAULT_CONTEXT = 4096  # LocalAI's DefaultContextSize
DEFAULT_N_MAX = 6  # LocalAI's gallery default for draft-mtp (spec_n_max:6)
SPEC_TYPES = ("draft-mtp", *NGRAM_TYPES, "none")


def _bool(v: str) -> bool:
    s = v.strip().lower()
    if s in ("1", "true", "yes", "on", ""):
        return True
    if s in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true/false, got {v!r}")


def _spec_type(v: str) -> tuple[str, ...]:
    """The supported types of a comma list, in order (llama.cpp chains them; others are skipped)."""
    names = tuple(n for n in (n.strip().replace("_", "-") for n in v.split(",")) if n in SPEC_TYPES)
    if not names:
        raise ValueError(f"supported spec types are {', '.join(SPEC_TYPES)}, got {v!r}")
    return names


def _prob(v: str) -> float:
    x = float(v)
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"must be in [0, 1], got {x}")
    return x


def _nonneg_int(v: str) -> int:
    x = int(v)
    if x < 0:
        raise ValueError(f"must be >= 0, got {x}")
    return x


def _cache_mib(v: str) -> int:
    x = int(v)
    if x < -1:
        raise ValueError(f"must be -1 (no limit), 0 (off) or a size in MiB, got {x}")
    return x


def _directory(v: str) -> str:
    if not v.strip():
        raise ValueError("needs a directory")
    return str(Path(v.strip()).expanduser())


def _positive_int(v: str) -> int:
    x = int(v)
    if x < 1:
        raise ValueError(f"must be >= 1, got {x}")
    return x


# option key -> (canonical name, parser). Aliases follow LocalAI's llama-cpp backend.
OWNED: dict[str, tuple[str, Callable[[str], Any]]] = {
    "spec_type": ("spec_type", _spec_type),
    "speculative_type": ("spec_type", _spec_type),
    "spec_n_max": ("n_max", _nonneg_int),
    "draft_max": ("n_max", _nonneg_int),
    "spec_n_min": ("n_min", _nonneg_int),
    "draft_min": ("n_min", _nonneg_int),
    "spec_p_min": ("p_min", _prob),
    "draft_p_min": ("p_min", _prob),
    "spec_adaptive": ("adaptive", _bool),
    "spec_ngram_size_n": ("ngram_size_n", _positive_int),
    "ngram_size_n": ("ngram_size_n", _positive_int),
    "spec_ngram_size_m": ("ngram_size_m", _positive_int),
    "ngram_size_m": ("ngram_size_m", _positive_int),
    "spec_ngram_mod_n_match": ("ngram_mod_n_match", _positive_int),
    "spec_ngram_mod_n_min": ("ngram_mod_n_min", _nonneg_int),
    "spec_ngram_mod_n_max": ("ngram_mod_n_max", _positive_int),
    "use_jinja": ("use_jinja", _bool),
    "n_ubatch": ("n_ubatch", _nonneg_int),
    "n_cpu_moe": ("n_cpu_moe", _nonneg_int),
    "cpu_moe": ("cpu_moe", _bool),
    "ubatch": ("n_ubatch", _nonneg_int),
    "parallel": ("parallel", _positive_int),
    "n_parallel": ("parallel", _positive_int),
    "rpc_servers": ("rpc_servers", parse_endpoints),
    "tensor_split": ("tensor_split", parse_tensor_split),
    # Prompt reuse (llama-server's names as LocalAI passes them, plus the disk cache, which is ours).
    "ctx_checkpoints": ("n_checkpoints", _nonneg_int),
    "n_ctx_checkpoints": ("n_checkpoints", _nonneg_int),
    "swa_checkpoints": ("n_checkpoints", _nonneg_int),
    "checkpoint_min_step": ("min_step", _positive_int),
    "cache_ram": ("ram_mib", _cache_mib),
    "cache_idle_slots": ("idle_slots", _bool),
    "slot_prompt_similarity": ("similarity", _prob),
    "prompt_cache_dir": ("disk_dir", _directory),
    "prompt_cache_mib": ("disk_mib", _positive_int),
    "prompt_cache_min_tokens": ("disk_min_tokens", _positive_int),
}
NGRAM_FIELDS = ("ngram_size_n", "ngram_size_m", "ngram_mod_n_match", "ngram_mod_n_min", "ngram_mod_n_max")
CACHE_FIELDS = ("n_checkpoints", "min_step", "ram_mib", "idle_slots", "similarity", "disk_dir", "disk_mib",
                "disk_min_tokens")


def parse_options(options: list[str]) -> dict[str, Any]:
    """`["spec_type:draft-mtp", "spec_n_max:6", "use_jinja"]` -> `{"spec_type": "draft-mtp", "n_max": 6, ...}`."""
    out: dict[str, Any] = {}
    for raw in options:
        key, _, value = raw.partition(":")
        key = key.strip().lstrip("-").replace("-", "_")
        if key not in OWNED:
            close = difflib.get_close_matches(key, OWNED, n=1, cutoff=0.8)
            if close:
                raise InvalidOptionError(f"unknown option {key!r} (did you mean {close[0]!r}?)")
            log.info("ignoring option %r (not used by this backend)", raw)
            continue
        name, parse = OWNED[key]
        try:
            out[name] = parse(value if value else "true") if parse is _bool else parse(value)
        except ValueError as exc:
            raise InvalidOptionError(f"option {key}: {exc}") from None
    return out


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


def resolve_mmproj(mmproj: str, model_path: str) -> Path:
    """ModelOptions.MMProj: absolute, or relative to ModelPath like Model; it must exist."""
    p = Path(mmproj)
    if not p.is_absolute() and model_path:
        p = Path(model_path) / p
    if not p.is_file():
        raise ModelNotFoundError(p, hint="MMProj names the vision projector file")
    return p


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


def plan_load(req: Any, info: GGUFInfo, path: Path) -> LoadPlan:
    """Turn a `ModelOptions` message and the file's header into a `LoadPlan`."""
    opts = parse_options(list(req.Options))
    has_head = info.has_mtp_head
    spec_types = opts.get("spec_type", ("draft-mtp",) if has_head else ("none",))
    ngram = next((t for t in spec_types if t in NGRAM_TYPES), "")
    n_max = opts.get("n_max", DEFAULT_N_MAX)
    if "draft-mtp" in spec_types and not has_head:
        mtp, reason = False, "MTP requested but the GGUF has no MTP head: decoding plainly"
    elif "draft-mtp" in spec_types and n_max == 0:
        mtp, reason = False, "spec_n_max is 0: decoding plainly"
    elif "draft-mtp" in spec_types:
        mtp, reason = True, f"MTP self-speculation on (n_max={n_max}, adaptive={opts.get('adaptive', True)})"
    else:
        mtp, reason = False, "spec_type none: decoding plainly"
    n_max = min(n_max, 16) if mtp else 0
    spec = SpecConfig(n_max=n_max, n_min=opts.get("n_min", 0), p_min=opts.get("p_min", 0.0),
                      adaptive=opts.get("adaptive", True), ngram=ngram,
                      **{k: opts[k] for k in NGRAM_FIELDS if k in opts})
    if ngram:
        reason = f"{ngram} drafting on (up to {spec.ngram_max} tokens), then " + (
            reason if "draft-mtp" in spec_types else "plain decoding where it finds no match")
    n_batch = req.NBatch if req.NBatch > 0 else 512
    cfg = EngineConfig(
        n_ctx=req.ContextSize if req.ContextSize > 0 else DEFAULT_CONTEXT,
        n_seq=opts.get("parallel", constants.LLAMACPP_PARALLEL),
        n_batch=n_batch,
        n_ubatch=opts.get("n_ubatch") or n_batch,
        n_threads=req.Threads if req.Threads > 0 else 0,
        n_gpu_layers=-1 if req.NGPULayers >= 9_999_999 else req.NGPULayers,
        use_mmap=req.MMap,
        use_mlock=req.MLock,
        flash_attn=_flash(req.FlashAttention),
        type_k=(req.CacheTypeKey or "f16").lower(),
        type_v=(req.CacheTypeValue or "f16").lower(),
        mtp=mtp,
        n_draft_max=spec.n_draft_max(mtp),
        embeddings=req.Embeddings,
        n_cpu_moe=-1 if opts.get("cpu_moe") else opts.get("n_cpu_moe", 0),
        rpc_servers=opts.get("rpc_servers", constants.RPC_SERVERS),
        tensor_split=opts.get("tensor_split") or (parse_tensor_split(req.TensorSplit) if req.TensorSplit else ()),
        mmproj=str(resolve_mmproj(req.MMProj, req.ModelPath)) if req.MMProj else "",
    )
    if cfg.n_gpu_layers != 0 and not cfg.rpc_servers:  # with workers, the offloaded layers go to their devices
        _warn_if_cpu_only(req.NGPULayers)
    return LoadPlan(path=path, engine=cfg, spec=spec, use_jinja=opts.get("use_jinja", True), mtp_reason=reason,
                    identity=req.Model, grammar_triggers=tuple(t.word for t in req.GrammarTriggers if t.word),
                    image_limit=max(req.LimitImagePerPrompt, 0),
                    cache=CacheConfig(**{k: opts[k] for k in CACHE_FIELDS if k in opts}))


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
    return {"true": "on", "enabled": "on", "1": "on", "false": "off", "disabled": "off", "0": "off"}.get(v, v)

