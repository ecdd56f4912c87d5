"""Build one APEX tier from a BF16/F16/F32 GGUF with llama.cpp's `llama_model_quantize`.

Every precondition is checked in Python first (llama.cpp aborts or writes garbage otherwise): the plan covers
every tensor, IQ1/IQ2/IQ3_XXS tensors have imatrix data, no silent requantization, enough disk. The output is
written under a temporary name and renamed only after its GGUF magic, tensor count and every tensor's type have
been checked against the plan, so an aborted or zero-header file is never published.
"""

from __future__ import annotations

import ctypes
import logging
import os
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from backend.core.errors import InvalidGGUFError, MissingImatrixError, QuantizerError
from backend.core.files import require_free_space

from . import types as gt
from .imatrix_file import Imatrix, coverage_report, imatrix_arrays
from .plan import ModelLayout, Plan, build_plan
from .recipes import Tier

if TYPE_CHECKING:
    import numpy as np

log = logging.getLogger(__name__)
PARTIAL_SUFFIX = ".partial"
_PRECISION_SUFFIX = re.compile(r"[-_.](bf16|f16|f32|fp16|fp32|q\d[a-z0-9_]*|iq\d[a-z0-9_]*)$", re.IGNORECASE)

# progress(stage, fraction 0..1, message)
ProgressFn = Callable[[str, float, str], None]


@dataclass(frozen=True)
class QuantizeResult:
    """A finished, verified tier file."""

    tier: str
    path: Path
    size_bytes: int
    predicted_bytes: int
    seconds: float
    n_tensors: int

    @property
    def prediction_error(self) -> float:
        return (self.size_bytes - self.predicted_bytes) / max(1, self.size_bytes)


def model_stem(source: str | Path) -> str:
    """Model name for output files: the source file name without `.gguf` and a precision suffix."""
    stem = Path(source).name.removesuffix(".gguf")
    return _PRECISION_SUFFIX.sub("", stem) or stem


def output_name(source: str | Path, tier: Tier, mtp: bool) -> str:
    """`<Model>-APEX[-MTP]-<Tier>.gguf`, upstream's naming."""
    return f"{model_stem(source)}-APEX{'-MTP' if mtp else ''}-{tier.name}.gguf"


def check_imatrix(plan: Plan, imatrix: Imatrix | None) -> list[tuple[str, str, float]]:
    """Refuse a plan whose IQ1/IQ2/IQ3_XXS tensors lack usable imatrix data; return the coverage of all tensors.

    Raises:
        MissingImatrixError: names the tensors (MTP head included) and what is wrong with each.
    """
    required = plan.imatrix_tensors
    if imatrix is None:
        if required or plan.tier.imatrix:
            names = ", ".join(t.name for t in required[:4]) or "(every tensor)"
            raise MissingImatrixError(
                f"tier {plan.tier.name} needs an importance matrix ({names}{' ...' if len(required) > 4 else ''}): "
                "pass --imatrix FILE or --calibration TEXT"
            )
        return []
    report = coverage_report(imatrix, ((t.name, t.imatrix_size) for t in plan.quantized))
    status = {name: st for name, st, _ in report}
    bad = [f"{t.name} ({status[t.name]})" for t in required if status[t.name] != "ok"]
    if bad:
        raise MissingImatrixError(
            f"tier {plan.tier.name}: {len(bad)} tensor(s) quantized to IQ1/IQ2/IQ3_XXS have no usable imatrix data: "
            + ", ".join(bad[:6]) + (" ..." if len(bad) > 6 else "")
            + " (collect the imatrix on this model with `apexmtp imatrix`, which covers the MTP head)"
        )
    return report


def check_requantize(plan: Plan, allow: bool) -> None:
    """Refuse to requantize already-quantized source tensors unless asked (quality compounds)."""
    if allow:
        return
    already = [t for t in plan.quantized if gt.is_quantized(t.source_type) and t.source_type != t.target_type]
    if already:
        raise QuantizerError(
            f"source tensors are already quantized ({already[0].name} is {already[0].source_type}); "
            "quantize from a BF16/F16/F32 GGUF, or pass --allow-requantize"
        )


def _kv_overrides(tier: Tier, imatrix: Imatrix | None, n_entries: int) -> list[tuple[str, int | str]]:
    """Provenance keys written into the output (llama-quantize's imatrix keys, plus the tier name)."""
    kv: list[tuple[str, int | str]] = [("apexmtp.tier", tier.name)]
    if imatrix is not None:
        kv += [("quantize.imatrix.file", Path(imatrix.path).name or "imatrix.gguf"),
               ("quantize.imatrix.entries_count", n_entries)]
        if imatrix.datasets:
            kv.append(("quantize.imatrix.dataset", Path(imatrix.datasets[0]).name))
        if imatrix.chunk_count:
            kv.append(("quantize.imatrix.chunks_count", imatrix.chunk_count))
    return [(k, v[:127] if isinstance(v, str) else v) for k, v in kv]


def _kv_bytes(kv: list[tuple[str, int | str]]) -> int:
    """GGUF bytes the overrides add: key (u64 len + bytes) + u32 type + value (u32, or u64 len + bytes)."""
    return sum(12 + len(k) + (4 if isinstance(v, int) else 8 + len(v.encode())) for k, v in kv)


class _Params:
    """`llama_model_quantize_params` plus the ctypes arrays it points into (kept alive together)."""

    def __init__(self, plan: Plan, arrays: dict[str, np.ndarray], kv: list[tuple[str, int | str]],
                 nthread: int, allow_requantize: bool) -> None:
        import llama_cpp as lc

        self.params = lc.llama_model_quantize_default_params()
        self.params.nthread = nthread
        self.params.ftype = gt.ftype_id(plan.tier.base_ftype)
        self.params.allow_requantize = allow_requantize
        self._patterns = [r.pattern.encode() for r in plan.rules]
        tt = (lc.llama_model_tensor_override * (len(plan.rules) + 1))()
        for i, (r, pat) in enumerate(zip(plan.rules, self._patterns, strict=True)):
            tt[i].pattern, tt[i].type = pat, gt.ggml_type_id(r.type_name)
        tt[len(plan.rules)].pattern = None  # terminator
        self.params.tt_overrides = ctypes.cast(tt, ctypes.POINTER(lc.llama_model_tensor_override))
        self._keep: list[object] = [tt]
        if arrays:
            im = (lc.llama_model_imatrix_data * (len(arrays) + 1))()
            for i, (name, data) in enumerate(arrays.items()):
                im[i].name, im[i].size = name.encode(), data.size
                im[i].data = data.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            im[len(arrays)].name = None
            self.params.imatrix = ctypes.cast(im, ctypes.POINTER(lc.llama_model_imatrix_data))
            self._keep += [im, arrays]
        kvo = (lc.llama_model_kv_override * (len(kv) + 1))()
        for i, (key, value) in enumerate(kv):
            kvo[i].key = key.encode()
            if isinstance(value, int):
                kvo[i].tag, kvo[i].value.val_i64 = lc.LLAMA_KV_OVERRIDE_TYPE_INT, value
            else:
                kvo[i].tag, kvo[i].value.val_str = lc.LLAMA_KV_OVERRIDE_TYPE_STR, value.encode()
        self.params.kv_overrides = ctypes.cast(kvo, ctypes.POINTER(lc.llama_model_kv_override))
        self._keep.append(kvo)


def _run_llama_quantize(source: Path, tmp: Path, params: _Params, predicted: int, progress: ProgressFn) -> None:
    """Run `llama_model_quantize` in a worker thread (ctypes drops the GIL) and report file growth as progress."""
    import llama_cpp as lc

    from backend.engine.llamalog import LLAMA_LOG, WARN

    result: dict[str, int] = {}

    def work() -> None:
        result["rc"] = lc.llama_model_quantize(os.fsencode(source), os.fsencode(tmp), ctypes.byref(params.params))

    with LLAMA_LOG.capture(WARN) as lines:
        worker = threading.Thread(target=work, name="llama-quantize", daemon=True)
        worker.start()
        while worker.is_alive():
            worker.join(0.25)
            size = tmp.stat().st_size if tmp.exists() else 0
            progress("quantizing", min(0.99, size / max(1, predicted)), tmp.name)
    if result.get("rc") != 0:
        reason = next((e for e in reversed(lines) if "failed to quantize" in e), lines[-1] if lines else "")
        raise QuantizerError(f"llama_model_quantize failed for {source.name}: {reason or 'no reason logged'}")


_DRY_RUN_LINE = re.compile(r"\]\s+(\S+)\s+- \[[^\]]*\], type =\s*(\S+), size =[^(\n]*(?:\((\S+)\))?")


def llama_dry_run(source: str | Path, plan: Plan) -> dict[str, str]:
    """Ask llama.cpp itself which type each tensor would get under the plan's rules (`dry_run`: nothing is
    written, no tensor data is read), so a plan can be checked against the real quantizer on any header,
    including sparse real-size layouts.

    Raises:
        QuantizerError: llama.cpp refused, or its log could not be parsed.
    """
    import llama_cpp as lc

    from backend.engine.llamalog import INFO, LLAMA_LOG

    params = _Params(plan, {}, [], 1, allow_requantize=True)
    params.params.dry_run = True
    with LLAMA_LOG.capture(INFO) as lines:
        rc = lc.llama_model_quantize(os.fsencode(source), os.fsencode(os.devnull), ctypes.byref(params.params))
    found = {m.group(1): gt.check_type(m.group(3) or m.group(2)) for m in _DRY_RUN_LINE.finditer("\n".join(lines))}
    if rc != 0 or len(found) != len(plan.tensors):
        raise QuantizerError(f"llama.cpp dry run failed (rc {rc}, {len(found)}/{len(plan.tensors)} tensors reported)")
    return found


def verify_output(path: Path, plan: Plan) -> None:
    """Check a written tier against its plan: GGUF magic/header, tensor count, every tensor's type.

    Raises:
        InvalidGGUFError: zero header, bad magic, truncation (via `read_gguf`).
        QuantizerError: count or a type differs from the plan.
    """
    from backend.core.gguf_file import read_gguf

    info = read_gguf(path)
    if len(info.tensors) != len(plan.tensors):
        raise QuantizerError(f"{path.name}: {len(info.tensors)} tensors, plan has {len(plan.tensors)}")
    wrong = [f"{t.name} is {t.type_name}, planned {plan.type_of(t.name)}"
             for t in info.tensors if t.type_name != plan.type_of(t.name)]
    if wrong:
        raise QuantizerError(f"{path.name}: {len(wrong)} tensor type(s) differ from the plan: " + "; ".join(wrong[:4]))


def quantize_tier(
    source: str | Path,
    tier: Tier,
    out_dir: str | Path,
    imatrix: Imatrix | None = None,
    *,
    nthread: int = 0,
    allow_requantize: bool = False,
    overwrite: bool = False,
    progress: ProgressFn | None = None,
) -> QuantizeResult:
    """Quantize `source` to `tier` into `out_dir/<Model>-APEX[-MTP]-<Tier>.gguf` and verify it.

    Args:
        source: BF16/F16/F32 GGUF (quantized sources need `allow_requantize`).
        tier: from `recipes.get_tier`; `I-` tiers need `imatrix`.
        out_dir: created if missing.
        imatrix: importance matrix collected on this model (ignored for plain tiers, which are built without).
        nthread: llama.cpp threads (0 = all cores).
        allow_requantize: accept already-quantized source tensors.
        overwrite: replace an existing output file.
        progress: called with (stage, fraction, message) while working.

    Raises:
        PlanError, MissingImatrixError, QuantizerError, InvalidGGUFError: see the module docstring; nothing is
            left behind on failure.
    """
    t0 = time.perf_counter()
    report = progress or (lambda stage, frac, msg: None)
    source = Path(source)
    layout = ModelLayout.from_gguf(source)
    plan = build_plan(layout, tier)
    used = imatrix if tier.imatrix else None
    check_imatrix(plan, used)
    check_requantize(plan, allow_requantize)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    final = out_dir / output_name(source, tier, layout.has_mtp)
    if final.exists() and not overwrite:
        raise QuantizerError(f"{final} exists (pass --overwrite to replace it)")
    arrays = imatrix_arrays(used, {t.name: t.imatrix_size for t in plan.quantized}) if used else {}
    kv = _kv_overrides(tier, used, len(arrays))
    predicted = plan.predicted_bytes(_kv_bytes(kv))
    # 2% headroom over the predicted size, so a slightly larger output never fills the disk
    require_free_space(out_dir, int(predicted * 1.02), what=f"tier {tier.name} ({final.name})")
    tmp = final.with_name(final.name + PARTIAL_SUFFIX)
    report("quantizing", 0.0, f"{source.name} -> {final.name}")
    try:
        _run_llama_quantize(source, tmp, _Params(plan, arrays, kv, nthread, allow_requantize), predicted, report)
        report("verifying", 0.99, final.name)
        verify_output(tmp, plan)
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    size = final.stat().st_size
    report("completed", 1.0, final.name)
    return QuantizeResult(tier.name, final, size, predicted, time.perf_counter() - t0, len(plan.tensors))


def check_published(path: str | Path) -> None:
    """Refuse a file that must not be uploaded: not a readable GGUF (e.g. the all-zero header of an aborted run).

    Raises:
        InvalidGGUFError
    """
    from backend.core.gguf_file import read_gguf

    p = Path(path)
    if p.name.endswith(PARTIAL_SUFFIX):
        raise InvalidGGUFError(p, "an unfinished quantization output")
    read_gguf(p)
