"""Ask llama.cpp itself how much memory a model and its contexts take (the reference the estimator is checked against).

The model is loaded with `no_alloc=True` (llama.cpp's own `--fit` dry run: metadata only, allocations simulated),
one target context and optionally an MTP context are created, and the sizes are read from llama.cpp's log:

* `llama_kv_cache: size = X MiB (...)` and `llama_memory_recurrent: size = X MiB (...)`, because under no_alloc the
  "KV buffer size" line prints 0.00 (hardware-fit.md §9, trap 1);
* `... compute buffer size = X MiB` (printed with its real, reserved size), summed over backends;
* weights are the GGUF's tensor bytes (the model buffer line prints 0.00 under no_alloc); with `alloc=True` the
  real buffers are created and their logged sizes are returned as well.

It runs in a child process (`python -m gallery.measure`): llama.cpp's log callback is process-global, and a C++
abort on a bad file must not take the caller down. Values are MiB with two decimals in the log, so each figure is
exact to about 5 KiB.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from backend.core.errors import ModelLoadError


@dataclass(frozen=True)
class ContextSpec:
    """One configuration to measure (a target context, plus an MTP context when `mtp`), built as the engine builds
    its contexts (backend/engine/llama.py `_new_context`): `n_ctx` is the context of ONE slot, `n_seq` slots share
    one unified KV buffer of `n_seq x n_ctx` cells, and the MTP context gets one output row per slot."""

    n_ctx: int
    n_ubatch: int = 512
    n_batch: int = 512
    type_k: str = "f16"
    type_v: str = "f16"
    n_seq: int = 1
    mtp: bool = False
    n_rs_seq: int = 0
    draft_type: str = "f16"
    kv_unified: bool = True


@dataclass(frozen=True)
class Measured:
    """llama.cpp's figures for one `ContextSpec`, in bytes (None where the log had no line for it)."""

    spec: ContextSpec
    kv: int
    rs: int
    compute: int
    output: int | None
    mtp_kv: int | None
    mtp_compute: int | None
    mtp_output: int | None
    model_buffers: int | None


def _ggml_type(name: str) -> int:
    import llama_cpp

    value = getattr(llama_cpp, f"GGML_TYPE_{name.upper()}", None)
    if value is None:
        raise ValueError(f"unknown KV cache type {name!r}")
    return int(value)


def _context(lib, model, spec: ContextSpec, *, mtp_of=None):
    cp = lib.llama_context_default_params()
    cp.n_ctx, cp.n_batch, cp.n_ubatch, cp.n_seq_max = spec.n_ctx * spec.n_seq, spec.n_batch, spec.n_ubatch, spec.n_seq
    cp.kv_unified = spec.kv_unified
    cp.flash_attn_type = lib.LLAMA_FLASH_ATTN_TYPE_ENABLED
    cp.n_threads = cp.n_threads_batch = 1
    if mtp_of is None:
        cp.type_k, cp.type_v = _ggml_type(spec.type_k), _ggml_type(spec.type_v)
        cp.n_rs_seq = spec.n_rs_seq if spec.mtp else 0
    else:  # the MTP draft context, as llama-server builds it (mtp-engine.md §1.3)
        cp.ctx_type = lib.LLAMA_CONTEXT_TYPE_MTP
        cp.type_k = cp.type_v = _ggml_type(spec.draft_type)
        cp.n_rs_seq = 0
        cp.n_outputs_max, cp.n_outputs_max_per_seq = spec.n_seq, 1
        cp.ctx_other = mtp_of
    ctx = lib.llama_init_from_model(model, cp)
    if not ctx:
        raise ModelLoadError(f"llama.cpp refused the context {spec}")
    return ctx


def _measure_in_process(path: str, specs: list[ContextSpec], alloc: bool) -> list[Measured]:
    import llama_cpp as lib

    from backend.engine.llamalog import LLAMA_LOG, parse_memory_lines

    LLAMA_LOG.install()
    lib.llama_backend_init()
    results = []
    for mtp in sorted({s.mtp for s in specs}):
        mp = lib.llama_model_default_params()
        mp.no_alloc = not alloc
        mp.load_mode = lib.LLAMA_LOAD_MODE_NONE if not alloc else lib.LLAMA_LOAD_MODE_MMAP
        mp.n_gpu_layers = 0
        mp.load_mtp = mtp
        with LLAMA_LOG.capture() as lines:
            model = lib.llama_model_load_from_file(path.encode(), mp)
        if not model:
            raise ModelLoadError(f"llama.cpp could not load {path}: {' '.join(lines)[-400:]}")
        model_buffers = parse_memory_lines(lines).get("model") if alloc else None
        for spec in (s for s in specs if s.mtp == mtp):
            results.append(_measure_spec(lib, model, spec, model_buffers))
        lib.llama_model_free(model)
    return results


def _measure_spec(lib, model, spec: ContextSpec, model_buffers: int | None) -> Measured:
    from backend.engine.llamalog import LLAMA_LOG, parse_memory_lines

    with LLAMA_LOG.capture() as lines:
        ctx = _context(lib, model, spec)
    target = parse_memory_lines(lines)
    draft: dict[str, int] = {}
    if spec.mtp:
        with LLAMA_LOG.capture() as lines:
            dft = _context(lib, model, spec, mtp_of=ctx)
        draft = parse_memory_lines(lines)
        lib.llama_free(dft)
    lib.llama_free(ctx)
    return Measured(
        spec=spec,
        kv=target.get("kv", 0),
        rs=target.get("recurrent", 0),
        compute=target.get("compute", 0),
        output=target.get("output"),
        mtp_kv=draft.get("kv") if spec.mtp else None,
        mtp_compute=draft.get("compute") if spec.mtp else None,
        mtp_output=draft.get("output") if spec.mtp else None,
        model_buffers=model_buffers,
    )


def measure(path: str | os.PathLike[str], specs: list[ContextSpec], *, alloc: bool = False,
            timeout: float = 300.0) -> list[Measured]:
    """Measure every spec on the GGUF at `path` in a child process (one model load per MTP setting).

    Args:
        path: the GGUF (checked in Python first, so llama.cpp never sees a malformed header).
        specs: the contexts to create.
        alloc: really allocate (mmap the weights, allocate KV/compute); default is llama.cpp's no_alloc dry run.
        timeout: seconds before the child is killed.

    Raises:
        ModelLoadError: llama.cpp refused the model or a context, or the child died.
    """
    from backend.core.gguf_file import check_header

    check_header(os.fspath(path))
    payload = json.dumps({"path": os.fspath(path), "alloc": alloc, "specs": [asdict(s) for s in specs]})
    proc = subprocess.run(
        [sys.executable, "-m", "gallery.measure", "--json-in", payload],
        capture_output=True, text=True, timeout=timeout, cwd=Path(__file__).resolve().parent.parent, check=False,
    )
    if proc.returncode != 0:
        raise ModelLoadError(f"measuring {path} failed (exit {proc.returncode}): {proc.stderr.strip()[-600:]}")
    rows = json.loads(proc.stdout.strip().splitlines()[-1])
    return [Measured(**{**r, "spec": ContextSpec(**r["spec"])}) for r in rows]


def main(argv: list[str] | None = None) -> int:
    """Child-process entry: `python -m gallery.measure --json-in '{"path":..., "specs":[...]}'` prints JSON rows."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json-in", required=True)
    args = parser.parse_args(argv)
    req = json.loads(args.json_in)
    results = _measure_in_process(req["path"], [ContextSpec(**s) for s in req["specs"]], bool(req.get("alloc")))
    print(json.dumps([asdict(r) for r in results]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
