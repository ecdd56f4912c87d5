"""llama.cpp through its C API: one model, a target context and, when the GGUF bundles one, an MTP context.

The engine owns every call into llama.cpp for generation. Each target decode is mirrored into the MTP
context with the target's hidden rows shifted by one (mtp-engine.md §1.5), so the head can draft at any
time; rollback after a verify keeps both contexts at identical positions. Preconditions are checked here,
in Python, because llama.cpp answers bad input with process aborts (GGML_ASSERT).
"""

from __future__ import annotations

import ctypes
import logging
import os
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np

import llama_cpp.llama_cpp as L
import llama_cpp.llama_cpp_ext as X

from . import constants
from .errors import (ContextOverflowError, InsufficientMemoryError, InvalidRequestError, ModelLoadError,
                     UnsupportedArchitectureError)
from .gguf_file import GGUFInfo, read_gguf

log = logging.getLogger(__name__)

KV_TYPES = {"f32": L.GGML_TYPE_F32, "f16": L.GGML_TYPE_F16, "q8_0": L.GGML_TYPE_Q8_0,
            "q4_0": L.GGML_TYPE_Q4_0, "q4_1": L.GGML_TYPE_Q4_1, "q5_0": L.GGML_TYPE_Q5_0, "q5_1": L.GGML_TYPE_Q5_1,
            "iq4_nl": L.GGML_TYPE_IQ4_NL}
FLASH_ATTN = {"auto": L.LLAMA_FLASH_ATTN_TYPE_AUTO, "on": L.LLAMA_FLASH_ATTN_TYPE_ENABLED,
              "off": L.LLAMA_FLASH_ATTN_TYPE_DISABLED}
# Architectures whose recurrent state supports n_rs_seq rollback (llama-arch.cpp); MTP needs it here.
MTP_ARCHS = frozenset({"qwen35", "qwen35moe"})
_DRAFT_TOP_K = 10  # llama.cpp's draft sampler: top-10, greedy top-1, p over the 10 (speculative.cpp)


# ------------------------------------------------------------------------------------------ logging


class _LlamaLog:
    """Routes llama.cpp's log to Python logging and lets a caller capture lines (memory figures)."""

    # ggml_log_level: 1 debug, 2 info, 3 warn, 4 error, 5 continuation of the previous line
    _LEVELS = {1: logging.DEBUG, 2: logging.INFO, 3: logging.WARNING, 4: logging.ERROR, 5: logging.DEBUG}

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._capture: list[str] | None = None
        self._partial = ""
        self._cb = L.llama_log_callback(self._on_log)  # keep a reference: ctypes must not free it
        self._installed = False
        self._logger = logging.getLogger("llama.cpp")
        # llama.cpp is chatty at INFO (every load prints ~150 lines): warnings only unless asked for more.
        self._logger.setLevel({0: logging.WARNING, 1: logging.INFO}.get(constants.LLAMA_LOG_LEVEL, logging.DEBUG))

    def install(self) -> None:
        if not self._installed:
            L.llama_log_set(self._cb, ctypes.c_void_p(0))
            self._installed = True

    def _on_log(self, level: int, text: bytes, _user: ctypes.c_void_p) -> None:
        msg = (text or b"").decode("utf-8", "replace")
        with self._lock:
            self._partial += msg
            if not self._partial.endswith("\n"):
                return
            lines, self._partial = self._partial.splitlines(), ""
            if self._capture is not None:
                self._capture.extend(lines)
        pylevel = self._LEVELS.get(level, logging.DEBUG)
        if pylevel == logging.WARNING and "unused tensor" in msg:
            pylevel = logging.DEBUG  # expected for MTP tensors when the head is not loaded
        if self._logger.isEnabledFor(pylevel):
            for line in lines:
                self._logger.log(pylevel, "%s", line)

    def capture(self) -> "_Capture":
        return _Capture(self)


class _Capture:
    def __init__(self, owner: _LlamaLog) -> None:
        self.owner, self.lines = owner, []

    def __enter__(self) -> list[str]:
        with self.owner._lock:
            self.owner._capture = self.lines
        return self.lines

    def __exit__(self, *exc: object) -> None:
        with self.owner._lock:
            self.owner._capture = None


LLAMA_LOG = _LlamaLog()
_BACKEND_READY = threading.Lock()
_backend_initialised = False


def _init_backend() -> None:
    global _backend_initialised
    with _BACKEND_READY:
        if not _backend_initialised:
            LLAMA_LOG.install()
            L.llama_backend_init()
            _backend_initialised = True


# "llama_kv_cache: size = ..." (not its "KV buffer size" line, which prints 0.00 under no_alloc), the
# recurrent state, and the per-backend compute/output buffers (summed across backends).
_MIB = re.compile(r"(?P<what>llama_kv_cache|llama_memory_recurrent): size = +(?P<mib>[\d.]+) MiB"
                  r"|(?P<buf>compute|output) buffer size = +(?P<mib2>[\d.]+) MiB")


def parse_memory_lines(lines: Iterable[str]) -> dict[str, int]:
    """Sum llama.cpp's logged buffer sizes (bytes) per kind: kv, recurrent, compute, output."""
    names = {"llama_kv_cache": "kv", "llama_memory_recurrent": "recurrent", "compute": "compute", "output": "output"}
    out: dict[str, int] = {}
    for line in lines:
        m = _MIB.search(line)
        if m:
            key = names[m.group("what") or m.group("buf")]
            out[key] = out.get(key, 0) + int(float(m.group("mib") or m.group("mib2")) * 1024 * 1024)
    return out


# ------------------------------------------------------------------------------------------- config


@dataclass(frozen=True)
class EngineConfig:
    """Everything fixed at load time. `n_draft_max > 0` with `mtp=True` enables MTP self-speculation."""

    n_ctx: int = 4096
    n_batch: int = 512
    n_ubatch: int = 512
    n_threads: int = 0  # 0: one per physical core
    n_gpu_layers: int = 0  # -1: all
    use_mmap: bool = True
    use_mlock: bool = False
    flash_attn: str = "auto"
    type_k: str = "f16"
    type_v: str = "f16"
    mtp: bool = False
    n_draft_max: int = 0
    embeddings: bool = False
    n_cpu_moe: int = 0  # keep the routed experts of the first N trunk layers in system RAM (-1: all layers)

    def __post_init__(self) -> None:
        if self.n_ctx < 8:
            raise InvalidRequestError(f"context size {self.n_ctx} is too small (minimum 8)")
        if self.n_batch < 1 or self.n_ubatch < 1:
            raise InvalidRequestError(f"batch sizes must be >= 1 (n_batch={self.n_batch}, n_ubatch={self.n_ubatch})")
        for name in ("type_k", "type_v"):
            if getattr(self, name) not in KV_TYPES:
                raise InvalidRequestError(f"unknown KV cache type {getattr(self, name)!r}; one of {sorted(KV_TYPES)}")
        if self.flash_attn not in FLASH_ATTN:
            raise InvalidRequestError(f"flash_attention must be one of {sorted(FLASH_ATTN)}, not {self.flash_attn!r}")
        if self.mtp and not 1 <= self.n_draft_max <= 16:
            raise InvalidRequestError(f"spec_n_max must be in 1..16 with MTP, not {self.n_draft_max}")


class _BuftOverride(ctypes.Structure):
    """llama.h `llama_model_tensor_buft_override` (the binding leaves the field an untyped pointer)."""

    _fields_ = [("pattern", ctypes.c_char_p), ("buft", ctypes.c_void_p)]


def _cpu_buffer_type() -> int:
    lib = ctypes.CDLL(str(Path(L.__file__).parent / "lib" / "libggml-base.so"))
    lib.ggml_backend_cpu_buffer_type.restype = ctypes.c_void_p
    return lib.ggml_backend_cpu_buffer_type()


def expert_pattern(n_cpu_moe: int, n_layers: int) -> str:
    """Regex for the routed-expert tensors of the first `n_cpu_moe` trunk layers (all when -1)."""
    layers = range(n_layers if n_cpu_moe < 0 else min(n_cpu_moe, n_layers))
    return r"^blk\.(" + "|".join(map(str, layers)) + r")\.ffn_(up|down|gate|gate_up)_exps\.weight$"


def _expert_overrides(n_cpu_moe: int, n_layers: int) -> ctypes.Array:
    """A NULL-terminated override array keeping those experts in a CPU buffer (llama.cpp's --n-cpu-moe)."""
    arr = (_BuftOverride * 2)()
    arr[0].pattern = expert_pattern(n_cpu_moe, n_layers).encode()
    arr[0].buft = _cpu_buffer_type()
    return arr


def default_threads() -> int:
    try:
        import psutil

        return max(1, psutil.cpu_count(logical=False) or os.cpu_count() or 1)
    except Exception:
        return max(1, os.cpu_count() or 1)


# ------------------------------------------------------------------------------------------- engine


@dataclass
class _Batch:
    """A llama_batch_ext bound to one context (never shared between contexts)."""

    ptr: int
    pos: ctypes.c_int32 = field(default_factory=ctypes.c_int32)

    def clear(self) -> None:
        L.llama_batch_ext_clear(self.ptr)

    def add(self, token: int, pos: int, *, output: bool = False, embd: np.ndarray | None = None) -> int:
        idx = L.llama_batch_ext_add_token(self.ptr, 0, token)
        if idx < 0:
            raise RuntimeError(f"llama_batch_ext_add_token failed ({idx})")
        self.pos.value = pos
        L.llama_batch_ext_set_pos(self.ptr, idx, ctypes.byref(self.pos))
        if embd is not None:
            row = L.llama_embd(embd.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), 1, embd.shape[0])
            if not L.llama_batch_ext_set_embd_token(self.ptr, idx, row):  # copies the row now
                raise RuntimeError("llama_batch_ext_set_embd_token failed")
        if output:
            L.llama_batch_ext_set_output_logits(self.ptr, idx, True)
        return idx

    def free(self) -> None:
        if self.ptr:
            L.llama_batch_ext_free(self.ptr)
            self.ptr = 0


class Engine:
    """A loaded GGUF with its target context (and MTP context when speculation is on).

    Not thread-safe: callers serialise access (the servicer holds a lock per request).
    """

    def __init__(self, path: str | Path, config: EngineConfig, *, eval_callback: object | None = None) -> None:
        self.path = str(path)
        self.info: GGUFInfo = read_gguf(path)
        self.config = config
        self.memory: dict[str, int] = {}
        self._model = self._ctx = self._dctx = self._ectx = None
        self._batch = self._dbatch = self._ebatch = None
        self._eval_callback = eval_callback
        _init_backend()
        try:
            self._load(config)
        except BaseException:
            self.close()
            raise

    # -- loading ---------------------------------------------------------------------------------

    @property
    def mtp_enabled(self) -> bool:
        return self._dctx is not None

    def _load(self, cfg: EngineConfig) -> None:
        arch = self.info.architecture
        if not arch:
            raise ModelLoadError(f"{self.path}: GGUF has no general.architecture key")
        if cfg.mtp:
            # A missing head must never reach llama.cpp's GGML_ASSERT in graph_mtp.
            if not self.info.has_mtp_head:
                raise ModelLoadError(f"{self.path}: MTP requested but the GGUF has no nextn (MTP) head")
            if arch not in MTP_ARCHS:
                raise ModelLoadError(f"{self.path}: MTP self-speculation supports {sorted(MTP_ARCHS)}, not {arch!r}")
        mp = L.llama_model_default_params()
        mp.n_gpu_layers = cfg.n_gpu_layers
        mode = L.LLAMA_LOAD_MODE_MMAP if cfg.use_mmap else L.LLAMA_LOAD_MODE_NONE
        if cfg.use_mlock:
            mode = L.LLAMA_LOAD_MODE_MMAP_MLOCK if cfg.use_mmap else L.LLAMA_LOAD_MODE_MLOCK
        mp.load_mode = mode
        mp.load_mtp = cfg.mtp
        overrides = _expert_overrides(cfg.n_cpu_moe, self.info.trunk_layers) if cfg.n_cpu_moe else None
        if overrides is not None:
            mp.tensor_buft_overrides = ctypes.cast(overrides, ctypes.c_void_p)
        with LLAMA_LOG.capture() as lines:
            self._model = L.llama_model_load_from_file(self.path.encode(), mp)
        if not self._model:
            detail = next((ln for ln in reversed(lines) if "error" in ln.lower() or "unknown" in ln.lower()), "")
            if "unknown model architecture" in detail:
                raise UnsupportedArchitectureError(self.path, arch)
            raise ModelLoadError(f"{self.path}: llama.cpp could not load the model" + (f": {detail.strip()}" if detail else ""))
        self.memory["weights"] = int(L.llama_model_size(self._model))
        self.vocab = L.llama_model_get_vocab(self._model)
        self.n_vocab = int(L.llama_vocab_n_tokens(self.vocab))
        self.n_embd = int(L.llama_model_n_embd_out(self._model))
        if cfg.mtp and L.llama_model_n_layer_nextn(self._model) < 1:
            raise ModelLoadError(f"{self.path}: llama.cpp loaded no MTP layer from this GGUF")
        self._ctx = self._new_context(cfg, mtp=False)
        self.n_ctx = int(L.llama_n_ctx(self._ctx))
        self.n_batch = int(L.llama_n_batch(self._ctx))
        self._batch = _Batch(L.llama_batch_ext_init(self._ctx))
        if cfg.mtp:
            got = int(L.llama_n_rs_seq(self._ctx))
            if got != cfg.n_draft_max:
                raise ModelLoadError(f"{self.path}: llama.cpp gave n_rs_seq={got}, {cfg.n_draft_max} needed for MTP rollback")
            X.llama_set_embeddings_nextn(self._ctx, True, False)  # an h row for every batch token
            self._dctx = self._new_context(cfg, mtp=True)
            X.llama_set_embeddings_nextn(self._dctx, True, True)  # h rows only for output tokens
            self._dbatch = _Batch(L.llama_batch_ext_init(self._dctx))
        self.tokens: list[int] = []  # what the target's memory holds, position by position
        self._pending_h = np.zeros(self.n_embd, dtype=np.float32)
        self._verify_h: np.ndarray | None = None
        # The MTP context already holds (y, pending_h) at the next position from the last draft step, which is
        # exactly the first row the next mirror would write; the mirror skips it (llama.cpp re-evaluates it).
        self._dctx_ahead: tuple[int, int] | None = None
        # Mirror entries (token, position, h row) not yet decoded into the MTP context. Mirroring is deferred
        # until the head must draft (or n_batch entries wait), so steps that do not speculate cost what plain
        # decoding costs and rejected drafts are never mirrored at all.
        self._mirror_queue: list[tuple[int, int, np.ndarray]] = []
        self.mirror_seconds = 0.0  # time spent decoding mirror entries (the controller leaves it out of step costs)

    def _new_context(self, cfg: EngineConfig, *, mtp: bool, embeddings: bool = False) -> int:
        cp = L.llama_context_default_params()
        threads = cfg.n_threads or default_threads()
        cp.n_ctx = cfg.n_ctx
        cp.n_batch = cfg.n_batch
        # A verify batch (k drafts + 1) must sit in one ubatch for the recurrent rollback snapshots.
        cp.n_ubatch = min(cfg.n_batch, max(cfg.n_ubatch, cfg.n_draft_max + 1))
        cp.n_seq_max = 1
        cp.n_threads = cp.n_threads_batch = threads
        cp.flash_attn_type = FLASH_ATTN[cfg.flash_attn]
        cp.type_k, cp.type_v = KV_TYPES[cfg.type_k], KV_TYPES[cfg.type_v]
        cp.embeddings = embeddings  # never on the target: it would break the rollback tail constraint
        if self._eval_callback is not None:
            cp.cb_eval = self._eval_callback
        if mtp:
            cp.ctx_type = L.LLAMA_CONTEXT_TYPE_MTP
            cp.n_rs_seq = 0
            cp.ctx_other = self._ctx
            cp.type_k = cp.type_v = L.GGML_TYPE_F16
            cp.n_outputs_max = cp.n_outputs_max_per_seq = 1
        elif cfg.mtp and not embeddings:
            cp.n_rs_seq = cfg.n_draft_max
        if embeddings:
            cp.pooling_type = L.LLAMA_POOLING_TYPE_MEAN
        name = "mtp" if mtp else ("embeddings" if embeddings else "target")
        with LLAMA_LOG.capture() as lines:
            ctx = L.llama_init_from_model(self._model, cp)
        if not ctx:
            failed = next((ln.strip() for ln in lines if "failed to allocate" in ln), "")
            if failed:
                raise InsufficientMemoryError(f"{self.path}: the {name} context (n_ctx={cfg.n_ctx}) does not fit in "
                                              f"memory ({failed}); lower ContextSize or use a smaller KV cache type")
            raise ModelLoadError(f"{self.path}: llama.cpp could not create the {name} context (n_ctx={cfg.n_ctx})")
        for kind, n in parse_memory_lines(lines).items():
            self.memory[f"{name}_{kind}"] = n
        return ctx

    def close(self) -> None:
        """Free every llama.cpp object (idempotent)."""
        for batch in (self._batch, self._dbatch, self._ebatch):
            if batch is not None:
                batch.free()
        for attr in ("_ectx", "_dctx", "_ctx"):
            ctx = getattr(self, attr, None)
            if ctx:
                L.llama_free(ctx)
                setattr(self, attr, None)
        if self._model:
            L.llama_model_free(self._model)
            self._model = None

    # -- vocabulary --------------------------------------------------------------------------------

    def tokenize(self, text: str, *, add_special: bool = True, parse_special: bool = True) -> list[int]:
        data = text.encode("utf-8")
        cap = len(data) + 16
        buf = (L.llama_token * cap)()
        n = L.llama_tokenize(self.vocab, data, len(data), buf, cap, add_special, parse_special)
        if n < 0:
            cap = -n
            buf = (L.llama_token * cap)()
            n = L.llama_tokenize(self.vocab, data, len(data), buf, cap, add_special, parse_special)
        return list(buf[:n])

    def piece(self, token: int, *, special: bool = False) -> bytes:
        """The bytes of one token (may be part of a UTF-8 character)."""
        buf = ctypes.create_string_buffer(64)
        n = L.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, special)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = L.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, special)
        return buf.raw[:n]

    def detokenize(self, tokens: Iterable[int], *, special: bool = False) -> bytes:
        return b"".join(self.piece(t, special=special) for t in tokens)

    def is_eog(self, token: int) -> bool:
        return bool(L.llama_vocab_is_eog(self.vocab, token))

    def check_tokens(self, tokens: Iterable[int]) -> None:
        bad = [t for t in tokens if not 0 <= t < self.n_vocab]
        if bad:
            raise InvalidRequestError(f"token ids {bad[:5]} are outside the vocabulary (0..{self.n_vocab - 1})")

    def meta(self, key: str) -> str | None:
        buf = ctypes.create_string_buffer(1 << 16)
        n = L.llama_model_meta_val_str(self._model, key.encode(), buf, len(buf))
        return buf.value.decode("utf-8", "replace") if n >= 0 else None

    # -- decoding ----------------------------------------------------------------------------------

    @property
    def n_past(self) -> int:
        return len(self.tokens)

    def reset(self) -> None:
        """Forget everything in both contexts."""
        L.llama_memory_clear(L.llama_get_memory(self._ctx), True)
        if self._dctx:
            L.llama_memory_clear(L.llama_get_memory(self._dctx), True)
        self.tokens = []
        self._pending_h = np.zeros(self.n_embd, dtype=np.float32)
        self._dctx_ahead = None
        self._mirror_queue = []

    def _truncate(self, n_keep: int) -> None:
        """Drop positions >= n_keep from both contexts, or everything when the target cannot."""
        if n_keep >= self.n_past:
            return
        if n_keep > 0 and L.llama_memory_seq_rm(L.llama_get_memory(self._ctx), 0, n_keep, -1):
            if self._dctx:
                L.llama_memory_seq_rm(L.llama_get_memory(self._dctx), 0, n_keep, -1)
                self._dctx_ahead = None
                self._mirror_queue = [e for e in self._mirror_queue if e[1] < n_keep]
            del self.tokens[n_keep:]
        else:
            self.reset()

    def prefill(self, prompt: list[int]) -> None:
        """Make the context hold `prompt[:-1]` then decode the last token with logits (row -1).

        Reuses the longest common prefix already in memory when llama.cpp can truncate to it (a recurrent
        model only within its rollback window); otherwise starts over.
        """
        if not prompt:
            raise InvalidRequestError("empty prompt: nothing to condition on")
        self.check_tokens(prompt)
        if len(prompt) >= self.n_ctx:
            raise ContextOverflowError(len(prompt), self.n_ctx)
        common = 0
        for a, b in zip(self.tokens, prompt):
            if a != b:
                break
            common += 1
        self._truncate(min(common, len(prompt) - 1))
        todo = prompt[self.n_past:]
        for start in range(0, len(todo), self.n_batch):
            chunk = todo[start:start + self.n_batch]
            self.decode(chunk, logits="last" if start + self.n_batch >= len(todo) else "none")

    def decode(self, tokens: list[int], *, logits: str = "all") -> None:
        """Decode `tokens` at the next positions of the target and mirror them into the MTP context.

        `logits`: "all" (verify batches), "last" or "none" (prompt chunks).
        """
        if self.n_past + len(tokens) > self.n_ctx:
            raise ContextOverflowError(self.n_past + len(tokens), self.n_ctx)
        b = self._batch
        b.clear()
        p0 = self.n_past
        last = len(tokens) - 1
        for i, tok in enumerate(tokens):
            b.add(tok, p0 + i, output=logits == "all" or (logits == "last" and i == last))
        rc = L.llama_process(self._ctx, L.LLAMA_PROCESS_TYPE_DECODE, b.ptr)
        if rc != 0:
            raise RuntimeError(f"llama.cpp decode failed ({rc}) at position {p0} with {len(tokens)} tokens")
        self.tokens.extend(tokens)
        if self._dctx:
            self._mirror(tokens, p0)

    def _mirror(self, tokens: list[int], p0: int) -> None:
        """Queue the MTP entries of a target decode: token p pairs with the target's hidden row of p-1."""
        n = len(tokens)
        ptr = X.llama_get_embeddings_nextn(self._ctx)
        # Copy at once: the next decode overwrites the output buffer.
        h = np.ctypeslib.as_array(ptr, shape=(n * self.n_embd,)).reshape(n, self.n_embd).copy()
        rows = [self._pending_h, *h[:-1]]
        self._mirror_queue.extend(zip(tokens, range(p0, p0 + n), rows))
        self._verify_h = h
        self._pending_h = h[-1].copy()
        if len(self._mirror_queue) >= self.n_batch:
            self.flush_mirror()

    def flush_mirror(self) -> None:
        """Decode every queued mirror entry into the MTP context (in n_batch chunks)."""
        queue, self._mirror_queue = self._mirror_queue, []
        if not queue and self._dctx_ahead is None:
            return
        t0 = time.perf_counter()
        if self._dctx_ahead is not None:
            if queue and (queue[0][1], queue[0][0]) == self._dctx_ahead:
                queue = queue[1:]
            else:  # not the step it was drafted for: drop the stale entry
                L.llama_memory_seq_rm(L.llama_get_memory(self._dctx), 0, self._dctx_ahead[0], -1)
            self._dctx_ahead = None
        db = self._dbatch
        for start in range(0, len(queue), self.n_batch):
            db.clear()
            for tok, pos, row in queue[start:start + self.n_batch]:
                db.add(tok, pos, embd=row)
            rc = L.llama_process(self._dctx, L.LLAMA_PROCESS_TYPE_DECODE, db.ptr)
            if rc != 0:
                raise RuntimeError(f"llama.cpp MTP mirror decode failed ({rc}) at position {queue[start][1]}")
        self.mirror_seconds += time.perf_counter() - t0

    def logits(self, idx: int) -> np.ndarray:
        """Output row `idx` of the last target decode (a view: copy it before the next decode)."""
        ptr = L.llama_get_logits_ith(self._ctx, idx)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))

    @property
    def ctx(self) -> int:
        return self._ctx

    # -- speculation -------------------------------------------------------------------------------

    def draft(self, token: int, n: int, p_min: float = 0.0) -> list[int]:
        """Draft up to `n` tokens after `token` (sampled, not yet decoded) with the MTP head.

        Greedy top-1 of the head's top-10 softmax; stops early when its probability is below `p_min`.
        Afterwards the MTP context holds only its first step, `(token, pending_h)` at the next position,
        which is exactly the first row the next mirror would write (so the mirror skips it).
        """
        if not self._dctx or n <= 0:
            return []
        self.flush_mirror()
        pos0 = self.n_past
        n = min(n, self.n_ctx - pos0 - 2)
        out: list[int] = []
        h, tok = self._pending_h, token
        db = self._dbatch
        kept_first = False
        for step in range(n):
            db.clear()
            idx = db.add(tok, pos0 + step, output=True, embd=h)
            if L.llama_process(self._dctx, L.LLAMA_PROCESS_TYPE_DECODE, db.ptr) != 0:
                break
            kept_first = True
            row = np.ctypeslib.as_array(L.llama_get_logits_ith(self._dctx, idx), shape=(self.n_vocab,))
            top = np.argpartition(row, -_DRAFT_TOP_K)[-_DRAFT_TOP_K:]
            vals = row[top]
            best = int(np.argmax(vals))
            if 1.0 / float(np.exp(vals - vals[best]).sum()) < p_min:
                break
            out.append(int(top[best]))
            if len(out) >= n:
                break
            h = np.ctypeslib.as_array(X.llama_get_embeddings_nextn_ith(self._dctx, idx), shape=(self.n_embd,)).copy()
            tok = out[-1]
        L.llama_memory_seq_rm(L.llama_get_memory(self._dctx), 0, pos0 + (1 if kept_first else 0), -1)
        self._dctx_ahead = (pos0, token) if kept_first else None
        return out

    def rollback_verify(self, n_batch: int, n_kept: int) -> None:
        """After a verify batch of `n_batch` tokens, keep its first `n_kept` in both contexts."""
        if self._verify_h is not None:
            self._pending_h = self._verify_h[n_kept - 1].copy()
        drop = n_batch - n_kept
        if drop <= 0:
            return
        keep_pos = self.n_past - drop
        if not L.llama_memory_seq_rm(L.llama_get_memory(self._ctx), 0, keep_pos, -1):
            raise RuntimeError(f"llama.cpp refused to roll back {drop} tokens (n_rs_seq too small?)")
        if self._dctx:
            L.llama_memory_seq_rm(L.llama_get_memory(self._dctx), 0, keep_pos, -1)
            self._mirror_queue = [e for e in self._mirror_queue if e[1] < keep_pos]
        del self.tokens[keep_pos:]

    # -- embeddings ----------------------------------------------------------------------------------

    def embed(self, tokens: list[int]) -> list[float]:
        """Mean-pooled embedding of `tokens` from a dedicated embeddings context (created on first use)."""
        if not self.config.embeddings:
            raise InvalidRequestError("embeddings are disabled for this model: load it with Embeddings=true")
        if not tokens:
            raise InvalidRequestError("nothing to embed: empty input")
        self.check_tokens(tokens)
        if len(tokens) > min(self.n_ctx, self.n_batch):
            raise InvalidRequestError(f"input is {len(tokens)} tokens; embeddings take at most {min(self.n_ctx, self.n_batch)}")
        if self._ectx is None:
            self._ectx = self._new_context(self.config, mtp=False, embeddings=True)
            self._ebatch = _Batch(L.llama_batch_ext_init(self._ectx))
        L.llama_memory_clear(L.llama_get_memory(self._ectx), True)
        b = self._ebatch
        b.clear()
        for i, tok in enumerate(tokens):
            b.add(tok, i, output=True)
        if L.llama_process(self._ectx, L.LLAMA_PROCESS_TYPE_DECODE, b.ptr) != 0:
            raise RuntimeError("llama.cpp failed to compute embeddings")
        n_embd = int(L.llama_model_n_embd(self._model))
        ptr = L.llama_get_embeddings_seq(self._ectx, 0)
        return np.ctypeslib.as_array(ptr, shape=(n_embd,)).astype(float).tolist()
