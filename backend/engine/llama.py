"""llama.cpp through its C API: one model, a target context serving several sequences, and an MTP context.

The engine owns every llama.cpp object it creates and frees them in order (batches, contexts, model); a closed
engine refuses every call with `EngineClosedError`. It serves `n_seq` sequences (the scheduler's slots) from
one target context with a unified KV buffer, so any mix of sequences can share a ubatch. Each target decode
is queued for mirroring into the MTP context with the target's hidden rows shifted by one (mtp-engine.md
§1.5), so the head can draft for any sequence at any time; rollback after a verify keeps both contexts at
identical positions per sequence. Preconditions are checked here, in Python, because llama.cpp answers bad
input with process aborts (GGML_ASSERT).

Not thread-safe: one thread (the scheduler's) calls the decoding methods. `tokenize`, `piece` and friends read
the immutable vocabulary and may be called from any thread while the engine is open.
"""

from __future__ import annotations

import collections
import ctypes
import functools
import logging
import os
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, TypeVar

import llama_cpp.llama_cpp as L
import llama_cpp.llama_cpp_ext as X
import numpy as np

from ..core import ggml
from ..core.errors import (
    ContextOverflowError,
    EngineClosedError,
    InsufficientMemoryError,
    InvalidOptionError,
    InvalidRequestError,
    ModelLoadError,
    RerankUnavailableError,
    UnsupportedArchitectureError,
)
from ..core.gguf_file import GGUFInfo, read_gguf
from ..rpc.client import Workers, split_array
from .llamalog import LIVE, LLAMA_LOG, parse_device_lines, parse_memory_lines
from .prompt_cache import TURN_MARKERS, Checkpoint, SavedState, common_prefix, thin
from .speculative import greedy_pick
from .vision import Image, Projector

log = logging.getLogger(__name__)

KV_TYPES = {"f32": L.GGML_TYPE_F32, "f16": L.GGML_TYPE_F16, "q8_0": L.GGML_TYPE_Q8_0,
            "q4_0": L.GGML_TYPE_Q4_0, "q4_1": L.GGML_TYPE_Q4_1, "q5_0": L.GGML_TYPE_Q5_0, "q5_1": L.GGML_TYPE_Q5_1,
            "iq4_nl": L.GGML_TYPE_IQ4_NL}
UNBLOCKED_KV_TYPES = frozenset({"f32", "f16"})
KV_BLOCK = 32  # values per block of every quantized KV type above (QK8_0, QK4_0, QK4_1, QK5_0, QK5_1, QK4_NL)
FLASH_ATTN = {"auto": L.LLAMA_FLASH_ATTN_TYPE_AUTO, "on": L.LLAMA_FLASH_ATTN_TYPE_ENABLED,
              "off": L.LLAMA_FLASH_ATTN_TYPE_DISABLED}
SPLIT_MODES = {"none": L.LLAMA_SPLIT_MODE_NONE, "layer": L.LLAMA_SPLIT_MODE_LAYER, "row": L.LLAMA_SPLIT_MODE_ROW,
               "tensor": L.LLAMA_SPLIT_MODE_TENSOR}
ROPE_SCALINGS = {"": L.LLAMA_ROPE_SCALING_TYPE_UNSPECIFIED, "none": L.LLAMA_ROPE_SCALING_TYPE_NONE,
                 "linear": L.LLAMA_ROPE_SCALING_TYPE_LINEAR, "yarn": L.LLAMA_ROPE_SCALING_TYPE_YARN}
POOLINGS = {"mean": L.LLAMA_POOLING_TYPE_MEAN, "cls": L.LLAMA_POOLING_TYPE_CLS, "last": L.LLAMA_POOLING_TYPE_LAST}
KV_OVERRIDE_TAGS = {"int": L.LLAMA_KV_OVERRIDE_TYPE_INT, "float": L.LLAMA_KV_OVERRIDE_TYPE_FLOAT,
                    "bool": L.LLAMA_KV_OVERRIDE_TYPE_BOOL, "str": L.LLAMA_KV_OVERRIDE_TYPE_STR}
# Architectures whose recurrent state supports n_rs_seq rollback (llama-arch.cpp); MTP needs it here.
MTP_ARCHS = frozenset({"qwen35", "qwen35moe"})
MAX_SEQ = 64  # slots per model; llama.cpp allows 256 sequences, far beyond what one host serves usefully
MAX_DRAFT = 1024  # llama.cpp's bound on a draft (--spec-ngram-mod-n-max)

_backend_initialised = False


def _init_backend() -> None:
    global _backend_initialised
    if not _backend_initialised:
        LLAMA_LOG.install()
        L.llama_backend_init()
        _backend_initialised = True


# ------------------------------------------------------------------------------------------- config


@dataclass(frozen=True)
class KVOverride:
    """One GGUF metadata override (ModelOptions.Overrides `key=type:value`), applied by llama.cpp's loader."""

    key: str
    kind: str  # int | float | bool | str
    value: int | float | bool | str


@dataclass(frozen=True)
class EngineConfig:
    """Everything fixed at load time. `mtp=True` loads the MTP head for self-speculation; `n_draft_max` is the
    longest verify draft of any origin (MTP or n-gram): it sizes the batches. 0: no speculation. On a recurrent
    model `n_rs_seq` is how many tokens a verify can roll back in place (llama.cpp's recurrent snapshots, which
    cost every decode in proportion); None: `n_draft_max`. A longer row is rolled back from a snapshot taken
    before it and the kept tokens decoded again, as llama-server does for n-gram drafts.

    `n_ctx` is the context of one sequence (slot): the longest prompt + output a request can have. The KV
    buffer holds `n_seq * n_ctx` tokens, shared by all sequences (llama.cpp's unified KV).
    """

    n_ctx: int = 4096
    n_seq: int = 1
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
    n_rs_seq: int | None = None
    embeddings: bool = False
    n_cpu_moe: int = 0  # keep the routed experts of the first N trunk layers in system RAM (-1: all layers)
    rpc_servers: tuple[str, ...] = ()  # RPC workers (host:port) to split the layers across, with local GPUs
    tensor_split: tuple[float, ...] = ()  # proportion of layers per device (workers first); () splits by free memory
    mmproj: str = ""  # vision projector GGUF (LocalAI's MMProj), loaded through mtmd
    mmproj_offload: bool = True  # the projector on the GPU when layers are offloaded
    image_min_tokens: int = -1  # tokens per image for dynamic-resolution projectors (-1: the projector's own)
    image_max_tokens: int = -1
    n_threads_batch: int = 0  # prompt-batch threads (0: n_threads)
    adaptive_threads: bool = True  # fewer threads while other processes hold cores (threads.py)
    direct_io: bool = False  # read the weights with direct I/O (beats mmap/mlock)
    check_tensors: bool = False  # validate tensor data while loading
    warmup: bool = False  # one decode after loading that touches every weight (llama.cpp's warm-up)
    split_mode: str = "layer"  # none | layer | row | tensor (row/tensor need several local GPUs)
    main_gpu: int = 0  # the GPU holding everything with split_mode none
    devices: tuple[str, ...] | None = None  # ggml device names to offload to (() or ("none",): CPU only)
    tensor_overrides: tuple[tuple[str, str], ...] = ()  # (tensor regex, buffer type name), llama.cpp's -ot
    offload_kqv: bool = True  # False: the KV cache and attention stay on the CPU (LocalAI's NoKVOffload)
    op_offload: bool = True  # offload host tensor operations to the device
    swa_full: bool = False  # full-size sliding-window KV cache
    # One KV buffer for all slots (llama.cpp's unified KV) or one stream per slot. Split is the default: attention
    # over a shared buffer reduces over other slots' cells in a layout that depends on the neighbours, so a greedy
    # answer could change with the load (measured: 6-7 of 8 SmolLM2 answers differed alone vs batched; 0 split).
    kv_unified: bool = False
    rope_scaling: str = ""  # none | linear | yarn; "": the model's own
    rope_freq_base: float = 0.0  # 0: the model's
    rope_freq_scale: float = 0.0  # 0: the model's
    yarn_ext_factor: float | None = None  # None: llama.cpp's default for the scaling type
    yarn_attn_factor: float | None = None
    yarn_beta_fast: float | None = None
    yarn_beta_slow: float | None = None
    kv_overrides: tuple[KVOverride, ...] = ()
    lora: tuple[tuple[str, float], ...] = ()  # (adapter GGUF, scale), applied to the target and embeddings contexts
    pooling: str = "mean"  # the embeddings context's pooling: mean | cls | last
    embd_normalize: int = 2  # llama.cpp's embd_normalize: -1 none, 0 max-abs, 1 taxicab, 2 euclidean, >2 p-norm
    reranking: bool = False  # a rank-pooled context serves `rerank` (the model needs a classification head)

    def __post_init__(self) -> None:
        if self.n_ctx < 8:
            raise InvalidRequestError(f"context size {self.n_ctx} is too small (minimum 8)")
        if not 1 <= self.n_seq <= MAX_SEQ:
            raise InvalidRequestError(f"parallel must be in 1..{MAX_SEQ}, not {self.n_seq}")
        if self.n_batch < 1 or self.n_ubatch < 1:
            raise InvalidRequestError(f"batch sizes must be >= 1 (n_batch={self.n_batch}, n_ubatch={self.n_ubatch})")
        for name in ("type_k", "type_v"):
            if getattr(self, name) not in KV_TYPES:
                raise InvalidRequestError(f"unknown KV cache type {getattr(self, name)!r}; one of {sorted(KV_TYPES)}")
        if self.flash_attn not in FLASH_ATTN:
            raise InvalidRequestError(f"flash_attention must be one of {sorted(FLASH_ATTN)}, not {self.flash_attn!r}")
        if not 0 <= self.n_draft_max <= MAX_DRAFT or (self.mtp and self.n_draft_max < 1):
            raise InvalidRequestError(f"the longest draft must be in {int(self.mtp)}..{MAX_DRAFT}"
                                      f"{' with MTP' if self.mtp else ''}, not {self.n_draft_max}")
        for name, table in (("split_mode", SPLIT_MODES), ("rope_scaling", ROPE_SCALINGS), ("pooling", POOLINGS)):
            if getattr(self, name) not in table:
                raise InvalidRequestError(f"{name} must be one of {sorted(k for k in table if k)}, "
                                          f"not {getattr(self, name)!r}")
        if self.embd_normalize < -1:
            raise InvalidRequestError(f"embd_normalize must be -1 (none) or more, not {self.embd_normalize}")
        if self.devices is not None and self.rpc_servers:
            raise InvalidRequestError("device and rpc_servers both choose the devices: give one of them")

    @property
    def batch_sizes(self) -> tuple[int, int]:
        """(n_batch, n_ubatch) as the contexts get them.

        Every slot's verify row `[y, d1..dk]` must fit one decode, and llama.cpp keeps the last n_rs_seq+1 tokens
        of each sequence in one ubatch for the rollback snapshots (it asserts n_ubatch > n_rs_seq + 1).
        """
        need = self.n_seq * (self.n_draft_max + 1) + 1 if self.n_draft_max else self.n_seq
        n_batch = max(self.n_batch, need)
        floor = max(need, self.rollback_depth + 2) if self.n_draft_max else 1
        return n_batch, min(n_batch, max(self.n_ubatch, floor))

    @property
    def rollback_depth(self) -> int:
        """Tokens a verify rolls back in place on a recurrent model (llama.cpp's n_rs_seq)."""
        return self.n_draft_max if self.n_rs_seq is None else min(self.n_rs_seq, self.n_draft_max)


class _BuftOverride(ctypes.Structure):
    """llama.h `llama_model_tensor_buft_override` (the binding leaves the field an untyped pointer)."""

    _fields_ = [("pattern", ctypes.c_char_p), ("buft", ctypes.c_void_p)]


def expert_pattern(n_cpu_moe: int, n_layers: int) -> str:
    """Regex for the routed-expert tensors of the first `n_cpu_moe` trunk layers (all when -1)."""
    layers = range(n_layers if n_cpu_moe < 0 else min(n_cpu_moe, n_layers))
    return r"^blk\.(" + "|".join(map(str, layers)) + r")\.ffn_(up|down|gate|gate_up)_exps\.weight$"


def _buft_overrides(cfg: EngineConfig, n_layers: int) -> ctypes.Array | None:
    """The NULL-terminated `tensor_buft_overrides` array: `override_tensor` entries first (llama.cpp takes the first
    pattern that matches), then the experts `n_cpu_moe` keeps in a CPU buffer (llama.cpp's --n-cpu-moe)."""
    if not cfg.tensor_overrides and not cfg.n_cpu_moe:
        return None
    bufts = ggml.buffer_types() if cfg.tensor_overrides else {}
    unknown = sorted({b for _, b in cfg.tensor_overrides if b not in bufts})
    if unknown:
        raise InvalidRequestError(f"override_tensor: unknown buffer type(s) {', '.join(unknown)}; "
                                  f"this build has {', '.join(bufts)}")
    pairs = [(pattern, bufts[name]) for pattern, name in cfg.tensor_overrides]
    for pattern, _ in pairs:
        try:
            re.compile(pattern)
        except re.error as exc:
            raise InvalidRequestError(f"override_tensor: {pattern!r} is not a regular expression ({exc})") from None
    if cfg.n_cpu_moe:
        pairs.append((expert_pattern(cfg.n_cpu_moe, n_layers), ggml.cpu_buffer_type()))
    arr = (_BuftOverride * (len(pairs) + 1))()
    for slot, (pattern, buft) in zip(arr, pairs):
        slot.pattern, slot.buft = pattern.encode(), buft
    return arr


def _local_gpus(cfg: EngineConfig) -> list[int]:
    return [] if cfg.rpc_servers else [d for d in ggml.offload_devices() if ggml.backend_name(d) != "RPC"]


def _placement(cfg: EngineConfig) -> tuple[int, int]:
    """(split_mode, main_gpu), checked against the local GPUs: llama.cpp fails a load (or asserts) otherwise."""
    gpus = _local_gpus(cfg)
    if cfg.split_mode in ("row", "tensor") and len(gpus) < 2:
        raise InvalidRequestError(f"split_mode:{cfg.split_mode} splits tensors across several GPUs; "
                                  f"{len(gpus)} visible here (use layer or none)")
    if gpus and cfg.main_gpu >= len(gpus):
        raise InvalidRequestError(f"MainGPU {cfg.main_gpu}: there are {len(gpus)} GPU(s) "
                                  f"({', '.join(ggml.name(d) for d in gpus)}), numbered from 0")
    return SPLIT_MODES[cfg.split_mode], cfg.main_gpu


def _device_array(names: tuple[str, ...]) -> ctypes.Array:
    """The NULL-terminated device array for `device:` names (`none`: no device, the CPU alone)."""
    wanted = [n for n in names if n.lower() != "none"]
    by_name = {ggml.name(d): d for d in ggml.local_devices() if ggml.device_type(d) != ggml.DEV_CPU}
    unknown = [n for n in wanted if n not in by_name]
    if unknown:
        raise InvalidRequestError(f"device: unknown device(s) {', '.join(unknown)}; this build offloads to "
                                  f"{', '.join(by_name) or 'no device (CPU only)'}")
    return (ctypes.c_void_p * (len(wanted) + 1))(*(by_name[n] for n in wanted))


def check_placement(cfg: EngineConfig, n_layers: int) -> None:
    """Refuse, before anything is freed or loaded, a placement this build cannot give: split_mode row/tensor
    without several GPUs, a MainGPU or device that does not exist, an override_tensor buffer type it lacks."""
    _placement(cfg)
    _buft_overrides(cfg, n_layers)
    if cfg.devices is not None and not cfg.rpc_servers:
        _device_array(cfg.devices)
    if cfg.main_gpu and not _local_gpus(cfg):
        log.warning("MainGPU %d has no effect: no GPU is visible", cfg.main_gpu)


def _kv_overrides(overrides: tuple[KVOverride, ...]) -> ctypes.Array | None:
    """The `kv_overrides` array, ended by an entry with an empty key (llama.cpp's terminator)."""
    if not overrides:
        return None
    arr = (L.llama_model_kv_override * (len(overrides) + 1))()
    for slot, o in zip(arr, overrides):
        slot.key, slot.tag = o.key.encode(), KV_OVERRIDE_TAGS[o.kind]
        if o.kind == "str":
            slot.value.val_str = str(o.value).encode()
        else:
            setattr(slot.value, {"int": "val_i64", "float": "val_f64", "bool": "val_bool"}[o.kind], o.value)
    return arr


# ------------------------------------------------------------------------------------------- pieces


class Batch:
    """A llama_batch_ext bound to one context (never shared between contexts)."""

    def __init__(self, ctx: int) -> None:
        self.ptr = L.llama_batch_ext_init(ctx)
        if not self.ptr:
            raise ModelLoadError("llama.cpp could not allocate a batch")
        LIVE["batch"] += 1
        self.n = 0
        self._pos = ctypes.c_int32()

    def clear(self) -> None:
        L.llama_batch_ext_clear(self.ptr)
        self.n = 0

    def add(self, token: int, pos: int, seq: int, *, output: bool = False, embd: np.ndarray | None = None) -> int:
        idx = L.llama_batch_ext_add_token(self.ptr, seq, token)
        if idx < 0:
            raise RuntimeError(f"llama_batch_ext_add_token failed ({idx})")
        self._pos.value = pos
        L.llama_batch_ext_set_pos(self.ptr, idx, ctypes.byref(self._pos))
        if embd is not None:
            row = L.llama_embd(embd.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), 1, embd.shape[0])
            if not L.llama_batch_ext_set_embd_token(self.ptr, idx, row):  # copies the row now
                raise RuntimeError("llama_batch_ext_set_embd_token failed")
        if output:
            L.llama_batch_ext_set_output_logits(self.ptr, idx, True)
        self.n += 1
        return idx

    def add_embd(self, row: np.ndarray, pos: np.ndarray, seq: int) -> int:
        """An input-embedding entry (an image row); `pos` holds its 4 M-RoPE sections (only the first is read
        on a model without M-RoPE)."""
        embd = L.llama_embd(row.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), 1, row.shape[0])
        idx = L.llama_batch_ext_add_embd(self.ptr, seq, embd)  # copies the row now
        if idx < 0:
            raise RuntimeError(f"llama_batch_ext_add_embd failed ({idx})")
        sections = (L.llama_pos * 4)(*(int(p) for p in pos))
        L.llama_batch_ext_set_pos(self.ptr, idx, sections)
        self.n += 1
        return idx

    def free(self) -> None:
        if self.ptr:
            L.llama_batch_ext_free(self.ptr)
            self.ptr = None
            LIVE["batch"] -= 1


@dataclass
class Row:
    """A run of one sequence's tokens inside a target decode; `first` is its first batch index once decoded.

    `logits`: "all" (verify rows), "last" (a prompt's final chunk) or "none" (other prompt chunks).
    """

    seq: int
    tokens: list[int]
    logits: str = "all"
    first: int = -1

    @property
    def last(self) -> int:
        return self.first + len(self.tokens) - 1


# A mirror entry taken off its queue for decoding: (seq, token, position, h row, M-RoPE sections or None).
_MirrorEntry = tuple[int, int, int, np.ndarray, np.ndarray | None]


@dataclass
class Sequence:
    """What one sequence of the contexts holds, and its MTP mirroring state."""

    tokens: list[int] = field(default_factory=list)  # the target's memory, position by position
    pending_h: np.ndarray | None = None  # the target's hidden row of the last decoded token
    verify_h: np.ndarray | None = None  # hidden rows of the last decode, for rollback
    # (position, token) of the first draft entry left in the MTP context by `draft`: exactly the first entry the
    # next mirror would write, so the mirror skips it (llama.cpp re-evaluates it).
    ahead: tuple[int, int] | None = None
    # Mirror entries (token, position, h row, M-RoPE sections) not yet decoded into the MTP context; an image row
    # has its negative key as token and its 4 position sections (None for text). Mirroring is deferred until the
    # head must draft for this sequence, so steps that do not speculate cost what plain decoding costs and
    # rejected drafts are never mirrored.
    mirror: list[tuple[int, int, np.ndarray, np.ndarray | None]] = field(default_factory=list)
    # Recurrent-state checkpoints of this sequence, by position (hybrid models only; see prompt_cache.py).
    checkpoints: list[Checkpoint] = field(default_factory=list)
    # The end of the prompt last prefilled here, with its last token's logits (see `Engine.record_end`).
    end: Checkpoint | None = None

    @property
    def saved_points(self) -> list[Checkpoint]:
        """The checkpoints, then the prompt's end when there is one."""
        return [*self.checkpoints, *([self.end] if self.end is not None else [])]


@dataclass
class _Drafting:
    """One sequence's state while `Engine.draft` runs: where its drafts start, how many it may take, the
    (token, hidden row) the head reads next, and the drafts so far."""

    seq: int
    first: int  # the token sampled for the sequence but not yet decoded: the head's first input
    pos0: int  # its position
    limit: int
    h: np.ndarray | None
    token: int = -1
    out: list[int] = field(default_factory=list)
    confident: bool = True  # every draft so far is above p_min
    entered: bool = False  # its first entry was decoded into the MTP context

    def __post_init__(self) -> None:
        self.token = self.first

    def wants_more(self, padding: bool) -> bool:
        """Whether it drafts another round: below its limit and confident, or padding beside a confident one."""
        return len(self.out) < self.limit and (self.confident or padding)

    def take(self, token: int, h: np.ndarray) -> None:
        self.out.append(token)
        self.token, self.h = token, h


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's malloc_trim, or None where the C library has none (musl, macOS, Windows)."""
    try:
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None


def _trim_heap() -> None:
    """Give the heap pages a freed model leaves behind back to the OS. glibc keeps freed chunks in its arenas, so
    without this a process that reloads models keeps the fragments of earlier ones resident (bench_soak: +24 MiB
    of anonymous memory on the first reload with MTP)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


class DecodeError(RuntimeError):
    """llama.cpp refused or failed a decode; the sequences involved were reset."""

    def __init__(self, message: str, seqs: Iterable[int]) -> None:
        super().__init__(message)
        self.seqs = tuple(sorted(set(seqs)))


F = TypeVar("F", bound=Callable)


def _open(method: F) -> F:
    """Refuse calls on a closed engine: llama.cpp would read freed memory."""

    @functools.wraps(method)
    def checked(self: "Engine", *args, **kwargs):
        if self._model is None:
            raise EngineClosedError(f"the engine for {self.path} is closed")
        return method(self, *args, **kwargs)

    return checked  # type: ignore[return-value]


def _vocab(method: F) -> F:
    """A vocabulary call from any thread: it holds the lock `close` takes, so the model cannot be freed under it."""
    opened = _open(method)

    @functools.wraps(method)
    def locked(self: "Engine", *args, **kwargs):
        with self._vocab_lock:
            return opened(self, *args, **kwargs)

    return locked  # type: ignore[return-value]


# ------------------------------------------------------------------------------------------- engine


class Engine:
    """A loaded GGUF with its target context (and MTP context when speculation is on), serving `n_seq` sequences."""

    # llama.cpp handles from the untyped binding: None before _load, after close and where a context is not made.
    _model: Any
    _ctx: Any
    _dctx: Any
    _ectx: Any
    _rctx: Any
    # Set by _load; mypy cannot infer them from there through the untyped binding.
    vocab: Any  # const llama_vocab *
    n_vocab: int
    n_embd: int
    n_embd_inp: int
    recurrent: bool
    n_ctx: int
    n_seq: int
    n_batch: int
    n_rs_seq: int
    seqs: list[Sequence]

    def __init__(self, path: str | Path, config: EngineConfig, *, eval_callback: object | None = None) -> None:
        self.path = str(path)
        self.info: GGUFInfo = read_gguf(path)
        self.config = config
        self.memory: dict[str, int] = {}
        self._model = None
        self._ctx = self._dctx = self._ectx = self._rctx = None
        self._batch: Batch | None = None
        self._dbatch: Batch | None = None
        self._ebatch: Batch | None = None
        self._rbatch: Batch | None = None
        self._loras: list[tuple[object, float]] = []  # (llama_adapter_lora *, scale), freed before the model
        self._params_keep: list[ctypes.Array | None] = []
        self._eval_callback = eval_callback
        self.projector: Projector | None = None
        self.workers: Workers | None = None
        self._vocab_lock = threading.Lock()
        self.mirror_seconds = 0.0  # time spent decoding mirror entries (a catch-up is left out of step costs)
        self.checkpoint_restores = 0
        _init_backend()
        try:
            self._load(config)
        except BaseException:
            self.close()
            raise

    # -- loading ---------------------------------------------------------------------------------

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
        self._check_cache_blocks(cfg)
        mp = self._model_params(cfg)
        with LLAMA_LOG.capture() as lines:
            self._model = L.llama_model_load_from_file(self.path.encode(), mp)
        self._check_workers()
        self._record_devices(lines, "")
        if self._model:
            LIVE["model"] += 1
        if not self._model:
            detail = next((ln for ln in reversed(lines) if "error" in ln.lower() or "unknown" in ln.lower()), "")
            if "unknown model architecture" in detail:
                raise UnsupportedArchitectureError(self.path, arch)
            raise ModelLoadError(f"{self.path}: llama.cpp could not load the model" + (f": {detail.strip()}" if detail else ""))
        self.memory["weights"] = int(L.llama_model_size(self._model))
        self.vocab = L.llama_model_get_vocab(self._model)
        self.n_vocab = int(L.llama_vocab_n_tokens(self.vocab))
        self.n_embd = int(L.llama_model_n_embd_out(self._model))
        # Recurrent layers take ubatches with an equal number of tokens per sequence (llama.cpp's split_equal).
        self.recurrent = bool(L.llama_model_is_recurrent(self._model) or L.llama_model_is_hybrid(self._model))
        if cfg.mtp and L.llama_model_n_layer_nextn(self._model) < 1:
            raise ModelLoadError(f"{self.path}: llama.cpp loaded no MTP layer from this GGUF")
        for path, scale in cfg.lora:
            self._load_lora(path, scale)
        self.n_threads = cfg.n_threads or ggml.default_threads()
        self.n_threads_batch = cfg.n_threads_batch or self.n_threads
        self._ctx = self._new_context(cfg, kind="target")
        self.n_ctx = cfg.n_ctx
        self.n_seq = cfg.n_seq
        self.n_batch = int(L.llama_n_batch(self._ctx))
        self._batch = Batch(self._ctx)
        # Attention KV rolls back anywhere; a recurrent state only as far as its n_rs_seq snapshots reach (and
        # llama.cpp sets none on architectures that cannot roll back).
        self.n_rs_seq = int(L.llama_n_rs_seq(self._ctx))
        if cfg.n_draft_max and (cfg.mtp or self.recurrent) and self.n_rs_seq != cfg.rollback_depth:
            raise ModelLoadError(f"{self.path}: llama.cpp gave n_rs_seq={self.n_rs_seq}, {cfg.rollback_depth} needed to "
                                 f"roll back drafts on this {arch} model; load it with spec_type:none")
        if cfg.warmup:
            self._warmup()
        if cfg.mtp:
            X.llama_set_embeddings_nextn(self._ctx, True, False)  # an h row for every batch token
            self._dctx = self._new_context(cfg, kind="mtp")
            X.llama_set_embeddings_nextn(self._dctx, True, True)  # h rows only for output tokens
            self._dbatch = Batch(self._dctx)
        self.seqs = [self._fresh_seq() for _ in range(cfg.n_seq)]
        self.n_embd_inp = int(L.llama_model_n_embd_inp(self._model))
        if cfg.mmproj:
            if cfg.mtp and self.n_embd_inp != self.n_embd:
                # Image rows reach the MTP context as input embeddings the width of its hidden input.
                raise ModelLoadError(f"{self.path}: MTP with a vision projector needs n_embd_inp == n_embd "
                                     f"({self.n_embd_inp} != {self.n_embd}); load with spec_type:none")
            self.projector = Projector(cfg.mmproj, self._model, n_embd=self.n_embd_inp,
                                       n_threads=cfg.n_threads or ggml.default_threads(),
                                       use_gpu=cfg.mmproj_offload and cfg.n_gpu_layers != 0,
                                       image_tokens=(cfg.image_min_tokens, cfg.image_max_tokens))
            self.memory["mmproj"] = self.projector.size

    def _check_cache_blocks(self, cfg: EngineConfig) -> None:
        """A quantized KV cache stores blocks of 32 values, which must not straddle attention heads: llama.cpp
        refuses such a context with a generic failure, so name the cause first."""
        heads = self.info.arch_key("attention.head_count", 0)
        n_head = max(heads, default=0) if isinstance(heads, (list, tuple)) else heads if isinstance(heads, int) else 0
        width = int(self.info.arch_key("embedding_length", 0) or 0) // max(n_head, 1)
        for name, key in (("type_k", "key_length"), ("type_v", "value_length")):
            kind, dim = getattr(cfg, name), int(self.info.arch_key(f"attention.{key}", 0) or width)
            if kind not in UNBLOCKED_KV_TYPES and dim % KV_BLOCK:
                raise InvalidOptionError(f"cache_type_{name[-1]} {kind} needs attention heads {KV_BLOCK} values wide "
                                         f"or a multiple; {Path(self.path).name} has {key} {dim}: use f16")

    def _load_lora(self, path: str, scale: float) -> None:
        """Load one LoRA adapter for this model; llama.cpp answers an adapter for another architecture or shape
        (or a file that is not one) with NULL and says why in its log."""
        with LLAMA_LOG.capture() as lines:
            adapter = L.llama_adapter_lora_init(self._model, path.encode())
        if not adapter:
            detail = next((ln.strip() for ln in reversed(lines) if "error" in ln.lower() or "failed" in ln.lower()), "")
            raise ModelLoadError(f"{path}: llama.cpp could not load this LoRA adapter for {self.path}"
                                 + (f": {detail}" if detail else "") + " (an adapter made for another base model?)")
        LIVE["lora"] += 1
        self._loras.append((adapter, scale))

    def _warmup(self) -> None:
        """llama.cpp's warm-up: decode BOS and EOS once with every MoE expert active, so the first request does not
        pay for paging the weights in, then forget it."""
        tokens = [t for t in (int(L.llama_vocab_bos(self.vocab)), int(L.llama_vocab_eos(self.vocab)))
                  if 0 <= t < self.n_vocab] or [0]
        L.llama_set_warmup(self._ctx, True)
        try:
            b = self._batch
            assert b is not None  # made with the target context, before any decode
            b.clear()
            for i, tok in enumerate(tokens):
                b.add(tok, i, 0, output=i == len(tokens) - 1)
            rc = L.llama_process(self._ctx, L.LLAMA_PROCESS_TYPE_DECODE, b.ptr)
        finally:
            L.llama_set_warmup(self._ctx, False)
        L.llama_memory_clear(L.llama_get_memory(self._ctx), True)
        if rc != 0:
            raise ModelLoadError(f"{self.path}: the warm-up decode failed ({rc})")

    def _model_params(self, cfg: EngineConfig) -> L.llama_model_params:
        """`llama_model_params` for `cfg`; the arrays it points to are kept in `self._params_keep` until close."""
        mp = L.llama_model_default_params()
        mp.n_gpu_layers = cfg.n_gpu_layers
        mode = L.LLAMA_LOAD_MODE_MMAP if cfg.use_mmap else L.LLAMA_LOAD_MODE_NONE
        if cfg.use_mlock:
            mode = L.LLAMA_LOAD_MODE_MMAP_MLOCK if cfg.use_mmap else L.LLAMA_LOAD_MODE_MLOCK
        mp.load_mode = L.LLAMA_LOAD_MODE_DIRECT_IO if cfg.direct_io else mode
        mp.load_mtp = cfg.mtp
        mp.check_tensors = cfg.check_tensors
        mp.split_mode, mp.main_gpu = _placement(cfg)
        keep = [_buft_overrides(cfg, self.info.trunk_layers), _kv_overrides(cfg.kv_overrides)]
        if keep[0] is not None:
            mp.tensor_buft_overrides = ctypes.cast(keep[0], ctypes.c_void_p)
        if keep[1] is not None:
            mp.kv_overrides = ctypes.cast(keep[1], ctypes.POINTER(L.llama_model_kv_override))
        if cfg.rpc_servers:  # probed before llama.cpp connects; it aborts on a worker it cannot reach
            self.workers = Workers(cfg.rpc_servers)
            mp.devices = self.workers.devices_pointer
            mp.n_gpu_layers = cfg.n_gpu_layers or -1  # the workers are there to hold layers
        elif cfg.devices is not None:
            devices = _device_array(cfg.devices)
            keep.append(devices)
            mp.devices = ctypes.cast(devices, ctypes.c_void_p)
        split = (self.workers.tensor_split(cfg.tensor_split) if self.workers else split_array(cfg.tensor_split)
                 ) if cfg.tensor_split else None
        if split is not None:
            keep.append(split)
            mp.tensor_split = ctypes.cast(split, ctypes.POINTER(ctypes.c_float))
        self._params_keep = keep
        return mp

    def _new_context(self, cfg: EngineConfig, *, kind: str) -> int:
        cp = L.llama_context_default_params()
        threads = cfg.n_threads or ggml.default_threads()
        n_batch, n_ubatch = cfg.batch_sizes
        single = kind in ("embeddings", "rank")  # one sequence, one whole input per decode
        n_seq = 1 if single else cfg.n_seq
        cp.n_ctx = cfg.n_ctx * n_seq
        cp.n_batch, cp.n_ubatch = (cfg.n_batch, cfg.n_batch) if single else (n_batch, n_ubatch)
        cp.n_seq_max = n_seq
        # A split KV puts one ubatch's sequences in consecutive ids only: `decode` orders rows so busy slots share it.
        cp.kv_unified = cfg.kv_unified if kind != "embeddings" else True
        cp.n_threads, cp.n_threads_batch = threads, cfg.n_threads_batch or threads
        cp.flash_attn_type = FLASH_ATTN[cfg.flash_attn]
        cp.type_k, cp.type_v = KV_TYPES[cfg.type_k], KV_TYPES[cfg.type_v]
        cp.embeddings = kind in ("embeddings", "rank")  # never on the target: it would break the rollback tail constraint
        cp.offload_kqv, cp.op_offload, cp.swa_full = cfg.offload_kqv, cfg.op_offload, cfg.swa_full
        # Every context of the model gets the same positions' rotations: the MTP head attends over the target's.
        cp.rope_scaling_type = ROPE_SCALINGS[cfg.rope_scaling]
        cp.rope_freq_base, cp.rope_freq_scale = cfg.rope_freq_base, cfg.rope_freq_scale
        for name in ("yarn_ext_factor", "yarn_attn_factor", "yarn_beta_fast", "yarn_beta_slow"):
            if getattr(cfg, name) is not None:
                setattr(cp, name, getattr(cfg, name))
        if self._eval_callback is not None:
            cp.cb_eval = self._eval_callback
        if kind == "mtp":
            cp.ctx_type = L.LLAMA_CONTEXT_TYPE_MTP
            cp.n_rs_seq = 0
            cp.ctx_other = self._ctx
            cp.type_k = cp.type_v = L.GGML_TYPE_F16
            cp.n_outputs_max, cp.n_outputs_max_per_seq = n_seq, 1  # one draft row per sequence per step
        elif kind == "target":
            cp.n_rs_seq = cfg.rollback_depth  # llama.cpp ignores it on a model without a recurrent state
        if kind == "embeddings":
            cp.pooling_type = POOLINGS[cfg.pooling]
        elif kind == "rank":
            cp.pooling_type = L.LLAMA_POOLING_TYPE_RANK
        with LLAMA_LOG.capture() as lines:
            ctx = L.llama_init_from_model(self._model, cp)
        if ctx:
            LIVE["context"] += 1
        if not ctx:
            failed = next((ln.strip() for ln in lines if "failed to allocate" in ln), "")
            if failed:
                raise InsufficientMemoryError(f"{self.path}: the {kind} context (n_ctx={cp.n_ctx}) does not fit in "
                                              f"memory ({failed}); lower ContextSize or parallel, or use a smaller KV "
                                              "cache type")
            raise ModelLoadError(f"{self.path}: llama.cpp could not create the {kind} context (n_ctx={cp.n_ctx})")
        for what, n in parse_memory_lines(lines).items():
            self.memory[f"{kind}_{what}"] = n
        self._check_workers()
        self._record_devices(lines, f"{kind}_")
        if self._loras and kind != "mtp":  # the head drafts from its own weights; verification keeps output exact
            n = len(self._loras)
            rc = L.llama_set_adapters_lora(ctx, (L.llama_adapter_lora_p_ctypes * n)(*(a for a, _ in self._loras)), n,
                                           (ctypes.c_float * n)(*(scale for _, scale in self._loras)))
            if rc != 0:
                L.llama_free(ctx)
                LIVE["context"] -= 1
                raise ModelLoadError(f"{self.path}: llama.cpp could not apply the LoRA adapter(s) to the {kind} "
                                     f"context ({rc})")
        return ctx

    def _record_devices(self, lines: list[str], prefix: str) -> None:
        """Per-device buffer sizes as `device:<name>:<prefix><kind>` (only when the model is split across RPC
        workers, where the share of each host is the point)."""
        if self.workers is not None:
            for device, kinds in parse_device_lines(lines).items():
                for what, n in kinds.items():
                    self.memory[f"device:{self.workers.device_name(device)}:{prefix}{what}"] = n

    def _check_workers(self) -> None:
        """Raise `WorkerLostError` when an RPC worker is gone: what llama.cpp computed meanwhile is garbage."""
        if self.workers is not None:
            self.workers.check()

    def _fresh_seq(self) -> Sequence:
        return Sequence(pending_h=np.zeros(self.n_embd, dtype=np.float32))

    @_open
    def set_threads(self, n: int) -> None:
        """Compute with at most `n` threads from the next decode on (the configured counts stay the ceiling)."""
        for ctx in (self._ctx, self._dctx):
            if ctx:
                L.llama_set_n_threads(ctx, min(n, self.n_threads), min(n, self.n_threads_batch))

    @property
    def closed(self) -> bool:
        return self._model is None

    @functools.cached_property
    def turn_markers(self) -> frozenset[int]:
        """Token ids of the chat-message openers (`TURN_MARKERS`) this vocabulary has as single control tokens."""
        found = set()
        for text in TURN_MARKERS:
            ids = self.tokenize(text, add_special=False, parse_special=True)
            if len(ids) == 1 and ids != self.tokenize(text, add_special=False, parse_special=False):
                found.add(ids[0])
        return frozenset(found)

    @property
    def state_settings(self) -> dict[str, object]:
        """The settings that shape a serialised sequence state besides the model file (prompt-cache identity)."""
        c = self.config
        # What changes the computed states: adapters, metadata overrides, RoPE and the SWA cache size.
        computed = {
            "lora": [[p, os.stat(p).st_size, os.stat(p).st_mtime_ns, scale] for p, scale in c.lora],
            "kv_overrides": [[o.key, o.kind, o.value] for o in c.kv_overrides],
            "rope": [c.rope_scaling, c.rope_freq_base, c.rope_freq_scale, c.yarn_ext_factor, c.yarn_attn_factor,
                     c.yarn_beta_fast, c.yarn_beta_slow],
            "swa_full": c.swa_full,
            "kv_unified": c.kv_unified,
        }
        return {"type_k": c.type_k, "type_v": c.type_v, "flash_attn": c.flash_attn, "mtp": self.mtp_enabled,
                "n_embd": self.n_embd, "n_vocab": self.n_vocab, "format": 1, **computed}

    @property
    def mtp_enabled(self) -> bool:
        return self._dctx is not None

    def close(self) -> None:
        """Free every llama.cpp object: the projector, batches and contexts before the model (idempotent)."""
        if self.projector is not None:
            self.projector.close()
            self.projector = None
        for attr in ("_batch", "_dbatch", "_ebatch", "_rbatch"):
            batch = getattr(self, attr)
            if batch is not None:
                batch.free()
                setattr(self, attr, None)
        for attr in ("_rctx", "_ectx", "_dctx", "_ctx"):  # the MTP context refers to the target: it goes first
            ctx = getattr(self, attr)
            if ctx:
                L.llama_free(ctx)
                setattr(self, attr, None)
                LIVE["context"] -= 1
        for adapter, _ in self._loras:  # after the contexts using them, before their model
            L.llama_adapter_lora_free(adapter)
            LIVE["lora"] -= 1
        self._loras = []
        with self._vocab_lock:  # no tokenize/piece from another thread is inside the model now
            if self._model:
                L.llama_model_free(self._model)
                self._model = None
                LIVE["model"] -= 1
        _trim_heap()

    # -- vocabulary (any thread) -------------------------------------------------------------------

    @_vocab
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

    @_vocab
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

    @_vocab
    def is_eog(self, token: int) -> bool:
        return bool(L.llama_vocab_is_eog(self.vocab, token))

    def check_tokens(self, tokens: Iterable[int]) -> None:
        bad = [t for t in tokens if not 0 <= t < self.n_vocab]
        if bad:
            raise InvalidRequestError(f"token ids {bad[:5]} are outside the vocabulary (0..{self.n_vocab - 1})")

    @_vocab
    def meta(self, key: str) -> str | None:
        buf = ctypes.create_string_buffer(1 << 16)
        n = L.llama_model_meta_val_str(self._model, key.encode(), buf, len(buf))
        return buf.value.decode("utf-8", "replace") if n >= 0 else None

    # -- sequences -----------------------------------------------------------------------------------

    def n_past(self, seq: int = 0) -> int:
        return len(self.seqs[seq].tokens)

    @_open
    def reset(self, seq: int | None = None) -> None:
        """Forget everything one sequence (or, with None, every sequence) holds in both contexts."""
        for s in range(self.n_seq) if seq is None else (seq,):
            for ctx in (self._ctx, self._dctx):
                if ctx:
                    L.llama_memory_seq_rm(L.llama_get_memory(ctx), s, -1, -1)
            self.seqs[s] = self._fresh_seq()

    @_open
    def keep_prefix(self, seq: int, prompt: list[int], *, whole: bool = False) -> int:
        """Keep the longest prefix of `prompt` the sequence already holds (at most all but its last token, whose
        logits are needed) and return its length; drop the rest. A recurrent model can truncate only within
        its rollback window; beyond it the sequence resumes from its newest checkpoint at or before the
        divergence, else starts over.

        With `whole`, a prompt the sequence last prefilled (its `end`) is kept entirely: the return value is then
        `len(prompt)` and `end_logits` is the row its first token is sampled from."""
        s = self.seqs[seq]
        n_common = common_prefix(s.tokens, prompt)
        if whole and s.end is not None and s.end.n_tokens == len(prompt) <= n_common and self._cut_to_end(seq):
            return len(prompt)
        n_keep = min(n_common, len(prompt) - 1)
        while 0 < n_keep < len(prompt) and prompt[n_keep] < 0 and prompt[n_keep - 1] == prompt[n_keep]:
            n_keep -= 1  # never cut an image's positions: its rows all sit at its first position
        if n_keep >= len(s.tokens):
            return len(s.tokens)
        if n_keep > 0 and L.llama_memory_seq_rm(L.llama_get_memory(self._ctx), seq, n_keep, -1):
            self._truncate(seq, n_keep)
            return n_keep
        # The prompt's end is a checkpoint too (a next turn that extends the prompt resumes exactly there).
        ckpt = max((c for c in s.saved_points if 0 < c.n_tokens <= n_keep), key=lambda c: c.n_tokens, default=None)
        if ckpt is not None and self._restore_checkpoint(seq, ckpt):
            self.checkpoint_restores += 1
            return ckpt.n_tokens
        self.reset(seq)
        return 0

    def _cut_to_end(self, seq: int) -> bool:
        """Cut the sequence back to its prompt's end (restoring the recurrent state saved there)."""
        end = self.seqs[seq].end
        assert end is not None
        if self.n_past(seq) == end.n_tokens:
            return True
        if not self._restore_checkpoint(seq, end):
            return False
        self.checkpoint_restores += bool(end.state)
        return True

    def end_logits(self, seq: int) -> np.ndarray:
        """The logits of the last token of the prompt the sequence holds whole (after `keep_prefix(whole=True)`)."""
        end = self.seqs[seq].end
        assert end is not None and end.logits is not None and end.n_tokens == self.n_past(seq)
        return end.logits

    @_open
    def record_end(self, seq: int, idx: int, limit: int) -> None:
        """Remember that the sequence holds a whole prompt whose last token is output row `idx` of the last decode:
        its logits, hidden row and (hybrid models) recurrent state, so the same prompt again starts from here.
        On a hybrid model the end is a checkpoint: none is kept when `limit` (checkpoints per slot) is 0."""
        s = self.seqs[seq]
        if self.recurrent and limit <= 0:
            return
        ckpt = self.snapshot(seq)  # None without recurrent layers: the KV alone is the state
        s.end = Checkpoint(len(s.tokens), ckpt.state if ckpt else b"", self._held_h(s), self.logits(idx).copy())

    def _truncate(self, seq: int, n: int) -> None:
        """Our record of a sequence whose target memory now ends at `n`: cut the MTP context and the mirror
        queue to match, and forget the checkpoints beyond it."""
        s = self.seqs[seq]
        if self._dctx:
            L.llama_memory_seq_rm(L.llama_get_memory(self._dctx), seq, n, -1)
            if s.ahead is not None and s.ahead[0] >= n:  # a draft's first entry before n stays in the context
                s.ahead = None
            s.mirror = [e for e in s.mirror if e[1] < n]
        del s.tokens[n:]
        s.checkpoints = [c for c in s.checkpoints if c.n_tokens <= n]
        if s.end is not None and s.end.n_tokens > n:
            s.end = None

    def _restore_checkpoint(self, seq: int, ckpt: Checkpoint) -> bool:
        """Put the recurrent state back as it was after `ckpt.n_tokens` tokens and drop the KV behind it. The MTP
        context holds attention KV only, so cutting it (and the mirror queue) at the same position suffices; the
        hidden row saved with the checkpoint is what the head drafts from next. A checkpoint without state (a
        prompt's end on a model without recurrent layers) only cuts the KV."""
        if (ckpt.state or self.recurrent) and \
                not self._set_state(self._ctx, seq, ckpt.state, L.LLAMA_STATE_SEQ_FLAGS_PARTIAL_ONLY):
            log.warning("%s: llama.cpp refused checkpoint at %d of sequence %d", self.path, ckpt.n_tokens, seq)
            return False
        if not L.llama_memory_seq_rm(L.llama_get_memory(self._ctx), seq, ckpt.n_tokens, -1):
            return False
        self._truncate(seq, ckpt.n_tokens)
        s = self.seqs[seq]
        s.verify_h = None
        if ckpt.h is not None:
            s.pending_h = ckpt.h.copy()
        return True

    # -- saved states (checkpoints, prompt cache) -----------------------------------------------------

    def _get_state(self, ctx: int, seq: int, flags: int) -> bytes:
        n = int(L.llama_state_seq_get_size_ext(ctx, seq, flags))
        buf = (ctypes.c_uint8 * max(n, 1))()
        got = int(L.llama_state_seq_get_data_ext(ctx, buf, n, seq, flags))
        if got == 0 and n:
            raise RuntimeError(f"llama.cpp could not serialise sequence {seq} ({n} bytes)")
        return ctypes.string_at(buf, got)

    def _set_state(self, ctx: int, seq: int, data: bytes, flags: int) -> bool:
        src = ctypes.cast(ctypes.c_char_p(data), ctypes.POINTER(ctypes.c_uint8))
        return int(L.llama_state_seq_set_data_ext(ctx, src, len(data), seq, flags)) > 0

    @_open
    def checkpoint(self, seq: int, limit: int) -> Checkpoint | None:
        """Save the sequence's recurrent state at its current length (hybrid/recurrent models only: attention KV
        needs none), keeping at most `limit` checkpoints for it."""
        s = self.seqs[seq]
        if limit <= 0:
            return None
        if s.checkpoints and s.checkpoints[-1].n_tokens == len(s.tokens):
            return s.checkpoints[-1]
        ckpt = self.snapshot(seq)
        if ckpt is not None:
            s.checkpoints = thin([*s.checkpoints, ckpt], limit)
        return ckpt

    @_open
    def snapshot(self, seq: int) -> Checkpoint | None:
        """The sequence's recurrent state at its current length, kept by the caller (None where attention KV is
        all it holds, or it holds nothing)."""
        s = self.seqs[seq]
        if not self.recurrent or not s.tokens:
            return None
        return Checkpoint(len(s.tokens), self._get_state(self._ctx, seq, L.LLAMA_STATE_SEQ_FLAGS_PARTIAL_ONLY),
                          self._held_h(s))

    def _held_h(self, s: Sequence) -> np.ndarray | None:
        """A copy of the hidden row the MTP head drafts from next (None without MTP)."""
        return s.pending_h.copy() if self._dctx and s.pending_h is not None else None

    @property
    def checkpoint_bytes(self) -> int:
        return sum(c.nbytes for s in self.seqs for c in s.saved_points)

    @_open
    def save_state(self, seq: int) -> SavedState | None:
        """Everything the sequence holds, to restore into this or another sequence later (None when empty)."""
        s = self.seqs[seq]
        if not s.tokens:
            return None
        mtp = b""
        if self._dctx:
            if s.ahead is not None:  # a draft's first entry: the mirror queue rewrites it, so it is not state
                L.llama_memory_seq_rm(L.llama_get_memory(self._dctx), seq, s.ahead[0], -1)
                s.ahead = None
            # The MTP context holds the positions before the mirror queue; the queue (not decoded until the head
            # next drafts) travels with the state instead of being decoded now for a state that may never draft.
            mtp = self._get_state(self._dctx, seq, L.LLAMA_STATE_SEQ_FLAGS_NONE)
        return SavedState(tokens=tuple(s.tokens), target=self._get_state(self._ctx, seq, L.LLAMA_STATE_SEQ_FLAGS_NONE),
                          mtp=mtp, h=self._held_h(s), checkpoints=tuple(s.checkpoints),
                          end=s.end, mirror=tuple(s.mirror))

    @_open
    def load_state(self, seq: int, saved: SavedState) -> bool:
        """Make the sequence hold exactly `saved` (replacing what it held); False, with the sequence empty, when
        llama.cpp cannot place it (e.g. no free KV cells) or it was saved without MTP and MTP is on."""
        self.reset(seq)
        if len(saved.tokens) >= self.n_ctx or bool(saved.mtp) != bool(self._dctx):
            return False
        ok = self._set_state(self._ctx, seq, saved.target, L.LLAMA_STATE_SEQ_FLAGS_NONE)
        if ok and self._dctx:
            ok = self._set_state(self._dctx, seq, saved.mtp, L.LLAMA_STATE_SEQ_FLAGS_NONE)
        if not ok:
            self.reset(seq)
            return False
        s = self.seqs[seq]
        s.tokens = list(saved.tokens)
        s.checkpoints = list(saved.checkpoints)
        end = saved.end
        s.end = end if end is not None and end.logits is not None and end.logits.shape == (self.n_vocab,) else None
        s.mirror = list(saved.mirror)
        if saved.h is not None:
            s.pending_h = saved.h.copy()
        return True

    # -- decoding ------------------------------------------------------------------------------------

    def _row_order(self, row: Row) -> tuple[int, int]:
        """Where a row goes in a batch. With a split KV llama.cpp puts only sequences of consecutive ids in one
        ubatch, taking equal token counts from each: by sequence id, so busy neighbours share a ubatch. With the
        unified KV a recurrent model still splits by equal counts: shortest first keeps rows of one length
        together."""
        return (row.seq, len(row.tokens)) if not self.config.kv_unified else (len(row.tokens), row.seq)

    @_open
    def decode(self, rows: list[Row]) -> None:
        """Decode every row at its sequence's next positions in ONE target decode, and queue their mirrors.

        Rows are placed in `_row_order`. On failure every sequence involved is reset and `DecodeError` names them.
        """
        b = self._batch
        assert b is not None  # made with the target context, before any decode
        b.clear()
        for row in sorted(rows, key=self._row_order):
            s = self.seqs[row.seq]
            p0 = len(s.tokens)
            if p0 + len(row.tokens) > self.n_ctx:
                raise ContextOverflowError(p0 + len(row.tokens), self.n_ctx)
            row.first = b.n
            last = len(row.tokens) - 1
            for i, tok in enumerate(row.tokens):
                b.add(tok, p0 + i, row.seq, output=row.logits == "all" or (row.logits == "last" and i == last))
        self._check_workers()
        rc = L.llama_process(self._ctx, L.LLAMA_PROCESS_TYPE_DECODE, b.ptr)
        self._check_workers()
        if rc != 0:
            for row in rows:
                self.reset(row.seq)  # earlier ubatches of the batch may have landed: start those sequences over
            what = {1: "no room in the KV cache", 2: "aborted"}.get(rc, "error")
            raise DecodeError(f"llama.cpp decode failed ({rc}: {what}) with {b.n} tokens", (r.seq for r in rows))
        h = None
        if self._dctx:
            # Copy at once: the next decode overwrites the output buffer.
            ptr = X.llama_get_embeddings_nextn(self._ctx)
            h = np.ctypeslib.as_array(ptr, shape=(b.n * self.n_embd,)).reshape(b.n, self.n_embd).copy()
        for row in rows:
            s = self.seqs[row.seq]
            p0 = len(s.tokens)
            s.tokens.extend(row.tokens)
            if h is not None:
                self._queue_mirror(s, row.tokens, p0, h[row.first:row.first + len(row.tokens)])

    def decode_tokens(self, tokens: list[int], *, seq: int = 0, logits: str = "all") -> Row:
        """One sequence's tokens in one decode (prompt chunks, evaluation); returns the decoded row."""
        row = Row(seq, tokens, logits)
        self.decode([row])
        return row

    def prefill(self, prompt: list[int], seq: int = 0) -> Row:
        """Make the sequence hold `prompt[:-1]`, reusing what it already holds, then decode the last token with
        logits; returns the last chunk's row (its `last` index is the logits row)."""
        if not prompt:
            raise InvalidRequestError("empty prompt: nothing to condition on")
        self.check_tokens(prompt)
        if len(prompt) >= self.n_ctx:
            raise ContextOverflowError(len(prompt), self.n_ctx)
        todo = prompt[self.keep_prefix(seq, prompt):]
        for start in range(0, len(todo), self.n_batch):
            row = self.decode_tokens(todo[start:start + self.n_batch], seq=seq,
                                     logits="last" if start + self.n_batch >= len(todo) else "none")
        return row

    @_open
    def decode_image(self, seq: int, image: Image) -> None:
        """Decode an encoded image into the sequence at its next position, as its own target decode(s).

        Its rows take M-RoPE positions from mtmd (all at the image's first position in time, spread in x/y), and
        it occupies `n_pos` positions. With MTP, each row is queued for the MTP context like text prefill: at the
        same positions, with the target's hidden row of the position before (so the text after the image pairs
        with the image's last hidden row), as an input embedding since an image row has no token.
        """
        s = self.seqs[seq]
        p0 = len(s.tokens)
        if p0 + image.n_pos > self.n_ctx:
            raise ContextOverflowError(p0 + image.n_pos, self.n_ctx)
        if image.embd.shape[1] != self.n_embd_inp:
            raise InvalidRequestError(f"image rows are {image.embd.shape[1]} wide; the model takes {self.n_embd_inp}")
        if self.projector is None:
            raise InvalidRequestError("this model has no vision projector (mmproj)")
        pos = image.rel_pos + (np.array([p0, p0, p0, 0], np.int32) if self.projector.mrope else p0)
        b = self._batch
        assert b is not None  # made with the target context, before any decode
        for start in range(0, image.n_tokens, self.n_batch):
            b.clear()
            stop = min(start + self.n_batch, image.n_tokens)
            for i in range(start, stop):
                b.add_embd(image.embd[i], pos[i], seq)
            self._check_workers()
            rc = L.llama_process(self._ctx, L.LLAMA_PROCESS_TYPE_DECODE, b.ptr)
            self._check_workers()
            if rc != 0:
                self.reset(seq)
                raise DecodeError(f"llama.cpp image decode failed ({rc}) with {b.n} rows", (seq,))
            if self._dctx:
                ptr = X.llama_get_embeddings_nextn(self._ctx)
                h = np.ctypeslib.as_array(ptr, shape=(b.n * self.n_embd,)).reshape(b.n, self.n_embd).copy()
                rows = [s.pending_h, *h[:-1]]
                s.mirror.extend((image.key, int(pos[i][0]), rows[i - start], pos[i]) for i in range(start, stop))
                s.pending_h = h[-1]
                s.verify_h = None
        s.tokens.extend([image.key] * image.n_pos)
        if len(s.mirror) >= self.n_batch:
            self.flush_mirror([seq])

    def _queue_mirror(self, s: Sequence, tokens: list[int], p0: int, h: np.ndarray) -> None:
        """Queue the MTP entries of a decoded row: token p pairs with the target's hidden row of p-1."""
        rows = [s.pending_h, *h[:-1]]
        s.mirror.extend((tok, pos, row, None) for tok, pos, row in zip(tokens, range(p0, p0 + len(tokens)), rows))
        s.verify_h = h
        s.pending_h = h[-1]
        if len(s.mirror) >= self.n_batch:
            self.flush_mirror([self.seqs.index(s)])

    @_open
    def flush_mirror(self, seqs: Iterable[int] | None = None, *, limit: int | None = None) -> None:
        """Decode the queued mirror entries of `seqs` (default all) into the MTP context, batched together; with
        `limit`, only each sequence's first `limit` entries (the rest stay queued, in order)."""
        if self._dctx:
            self._decode_mirror(self._take_mirror(range(self.n_seq) if seqs is None else seqs, limit))

    def _take_mirror(self, seqs: Iterable[int], limit: int | None = None) -> list[_MirrorEntry]:
        """Dequeue the mirror entries of `seqs` (each sequence's first `limit`, or all), without the entry the
        last draft already decoded (`Sequence.ahead`); a stale one is removed from the MTP context."""
        entries: list[_MirrorEntry] = []
        for seq in seqs:
            s = self.seqs[seq]
            queue, s.mirror = (s.mirror, []) if limit is None else (s.mirror[:limit], s.mirror[limit:])
            if s.ahead is not None:
                if queue and (queue[0][1], queue[0][0]) == s.ahead:
                    queue = queue[1:]
                else:  # not the step it was drafted for: drop the stale entry
                    L.llama_memory_seq_rm(L.llama_get_memory(self._dctx), seq, s.ahead[0], -1)
                s.ahead = None
            entries.extend((seq, *entry) for entry in queue)
        return entries

    def _decode_mirror(self, entries: list[_MirrorEntry]) -> None:
        """Decode mirror entries into the MTP context, at most n_batch of one kind per decode."""
        if not entries:
            return
        t0 = time.perf_counter()
        db = self._dbatch
        assert db is not None  # made with the MTP context
        start = 0
        while start < len(entries):
            # One decode holds at most n_batch entries of one kind: llama.cpp takes token+h entries and image rows
            # (input embeddings with M-RoPE positions) only in separate batches.
            image = entries[start][4] is not None
            db.clear()
            end = start
            while end < len(entries) and end - start < self.n_batch and (entries[end][4] is not None) == image:
                self._add_mirror(db, entries[end])
                end += 1
            rc = L.llama_process(self._dctx, L.LLAMA_PROCESS_TYPE_DECODE, db.ptr)
            if rc != 0:
                seqs_hit = {e[0] for e in entries}
                for seq in seqs_hit:
                    self.reset(seq)
                raise DecodeError(f"llama.cpp MTP mirror decode failed ({rc})", seqs_hit)
            start = end
        self.mirror_seconds += time.perf_counter() - t0

    def _requeue_mirror(self, entries: list[_MirrorEntry]) -> None:
        """Put entries whose decode failed back at the front of their queues, after removing from the MTP context
        whatever of them did land (llama.cpp may have decoded some ubatches)."""
        mem = L.llama_get_memory(self._dctx)
        for seq in dict.fromkeys(e[0] for e in entries):
            mine = [e[1:] for e in entries if e[0] == seq]
            L.llama_memory_seq_rm(mem, seq, min(pos for _, pos, _, _ in mine), -1)
            self.seqs[seq].mirror[:0] = mine

    @staticmethod
    def _add_mirror(db: Batch, entry: _MirrorEntry) -> None:
        seq, tok, pos, row, sections = entry
        if sections is not None:
            db.add_embd(row, sections, seq)
        else:
            db.add(tok, pos, seq, embd=row)

    @_open
    def logits(self, idx: int) -> np.ndarray:
        """Output row `idx` (a batch index) of the last target decode (a view: copy it before the next decode)."""
        ptr = L.llama_get_logits_ith(self._ctx, idx)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))

    @property
    def ctx(self) -> int:
        return self._ctx

    # -- speculation -------------------------------------------------------------------------------

    @_open
    def draft(self, starts: list[tuple[int, int, int]], p_min: float = 0.0) -> list[list[int]]:
        """Draft with the MTP head for several sequences at once: `starts` holds (seq, token, n) — the token
        sampled for the sequence but not yet decoded, and how many drafts it may take.

        Each round decodes one entry per drafting sequence in one MTP batch; a draft is the greedy top-1 of the
        head's top-10 softmax. A sequence stops at `n`, or when that probability falls below `p_min` — but on a
        recurrent model, where verify rows of unequal length split the target's ubatch, a sequence keeps
        drafting while any other sequence does, up to its `n`. Afterwards the MTP context holds only each
        sequence's first entry, `(token, pending_h)` at its next position (see `Sequence.ahead`).
        """
        if not self._dctx:
            return [[] for _ in starts]
        drafting = [self._drafting(seq, tok, n) for seq, tok, n in starts if n > 0]
        if not drafting:
            return [[] for _ in starts]
        # What the last verified step left to mirror rides in the first round's decode (a pass over the head's
        # weights fewer per step), counted as drafting; a longer catch-up (after steps that did not draft, which
        # the controller times apart) or image rows are decoded first, on their own.
        mirror = self._take_mirror(d.seq for d in drafting)
        per_seq = collections.Counter(e[0] for e in mirror)
        if any(e[4] is not None for e in mirror) or len(mirror) + len(drafting) > self.n_batch or \
                any(n > self.config.n_draft_max + 1 for n in per_seq.values()):
            self._decode_mirror(mirror)
            mirror = []
        db = self._dbatch
        assert db is not None  # made with the MTP context
        step = 0
        while live := [d for d in drafting if d.wants_more(self.recurrent and any(o.confident for o in drafting))]:
            db.clear()
            for entry in mirror:
                self._add_mirror(db, entry)
            rows = [db.add(d.token, d.pos0 + step, d.seq, output=True, embd=d.h) for d in live]
            if L.llama_process(self._dctx, L.LLAMA_PROCESS_TYPE_DECODE, db.ptr) != 0:
                self._requeue_mirror(mirror)  # no drafts this step; the next one mirrors them again
                break
            mirror = []
            for d in live:
                d.entered = True
            picks = [self._head_pick(idx, p_min) for idx in rows]
            for d, (_, sure) in zip(live, picks):
                d.confident &= sure
            if not any(d.confident for d in drafting):  # nobody goes on: this round holds only drafts below p_min
                break
            for d, idx, (tok, _) in zip(live, rows, picks):
                if d.confident or self.recurrent:  # on a recurrent model the others pad to an equal length
                    h = X.llama_get_embeddings_nextn_ith(self._dctx, idx)
                    d.take(tok, np.ctypeslib.as_array(h, shape=(self.n_embd,)).copy())
            step += 1
        self._decode_mirror(mirror)  # no sequence drafted a round: the entries are decoded on their own
        mem = L.llama_get_memory(self._dctx)
        for d in drafting:
            L.llama_memory_seq_rm(mem, d.seq, d.pos0 + (1 if d.entered else 0), -1)
            self.seqs[d.seq].ahead = (d.pos0, d.first) if d.entered else None
        by_seq = {d.seq: d.out for d in drafting}
        return [by_seq.get(seq, []) for seq, _, _ in starts]

    def _drafting(self, seq: int, token: int, n: int) -> _Drafting:
        pos = len(self.seqs[seq].tokens)
        return _Drafting(seq, token, pos, min(n, self.n_ctx - pos - 2), self.seqs[seq].pending_h)

    def _head_pick(self, idx: int, p_min: float) -> tuple[int, bool]:
        """The MTP head's greedy draft at batch row `idx`, and whether its top-10 softmax probability >= p_min."""
        return greedy_pick(np.ctypeslib.as_array(L.llama_get_logits_ith(self._dctx, idx), shape=(self.n_vocab,)), p_min)

    @_open
    def rollback_verify(self, seq: int, n_batch: int, n_kept: int, before: Checkpoint | None = None) -> list[int]:
        """After a verify row of `n_batch` tokens for `seq`, keep its first `n_kept` in both contexts.

        A recurrent state rolls back in place only `n_rs_seq` tokens; beyond that, the state goes back to
        `before` (its snapshot from before the row) and the kept tokens are returned: the caller decodes them
        again (after the step's other rows were read, since a decode overwrites the logits). Else []."""
        s = self.seqs[seq]
        if s.verify_h is not None and n_kept > 0:
            s.pending_h = s.verify_h[n_kept - 1]
        drop = n_batch - n_kept
        if drop <= 0:
            return []
        keep_pos = len(s.tokens) - drop
        if self.recurrent and drop > self.n_rs_seq:
            if before is None or before.n_tokens != len(s.tokens) - n_batch:
                raise RuntimeError(f"rolling back {drop} tokens of sequence {seq} needs a snapshot from before its "
                                   f"verify row (n_rs_seq {self.n_rs_seq})")
            kept = s.tokens[before.n_tokens:keep_pos]
            if not self._restore_checkpoint(seq, before):
                raise RuntimeError(f"llama.cpp refused the snapshot of sequence {seq} at {before.n_tokens}")
            return kept
        if not L.llama_memory_seq_rm(L.llama_get_memory(self._ctx), seq, keep_pos, -1):
            raise RuntimeError(f"llama.cpp refused to roll back {drop} tokens of sequence {seq} (n_rs_seq too small?)")
        if self._dctx:
            L.llama_memory_seq_rm(L.llama_get_memory(self._dctx), seq, keep_pos, -1)
            s.mirror = [e for e in s.mirror if e[1] < keep_pos]
        del s.tokens[keep_pos:]
        return []

    # -- embeddings ----------------------------------------------------------------------------------

    @_open
    def embed(self, tokens: list[int]) -> list[float]:
        """The pooled embedding of `tokens` (`pooling`, normalised by `embd_normalize` as llama-server does) from a
        dedicated embeddings context (created on first use)."""
        if not self.config.embeddings:
            raise InvalidRequestError("embeddings are disabled for this model: load it with Embeddings=true")
        vec = self._pooled("embeddings", tokens, int(L.llama_model_n_embd(self._model)))
        return normalize(vec, self.config.embd_normalize).astype(float).tolist()

    @_open
    def rerank(self, query: str, documents: list[str]) -> list[tuple[float, int]]:
        """(relevance score, tokens evaluated) of each document for `query`, from the model's classification head
        in a rank-pooled context, each pair laid out as llama-server lays it out (`format_prompt_rerank`)."""
        if not self.info.has_rank_head:
            raise RerankUnavailableError(f"this model has no reranking head ({Path(self.path).name} has no cls / "
                                         "cls.output tensor): load a reranker GGUF with Reranking=true")
        if not self.config.reranking:
            raise RerankUnavailableError(f"{Path(self.path).name} was loaded without Reranking=true")
        template = self.meta("tokenizer.chat_template.rerank")
        out = []
        for doc in documents:
            if template is not None:
                tokens = self.tokenize(template.replace("{query}", query).replace("{document}", doc),
                                       add_special=False, parse_special=True)
            else:
                tokens = self._rerank_pair(query, doc)
            out.append((float(self._pooled("rank", tokens, 1)[0]), len(tokens)))
        return out

    def _rerank_pair(self, query: str, doc: str) -> list[int]:
        """[BOS] query [EOS] [SEP] doc [EOS], each special token where the vocabulary asks for it (EOS falls back
        to SEP)."""
        v = self.vocab
        eos = int(L.llama_vocab_eos(v))
        eos = int(L.llama_vocab_sep(v)) if eos < 0 else eos
        add_eos = [eos] if L.llama_vocab_get_add_eos(v) else []
        return ([int(L.llama_vocab_bos(v))] if L.llama_vocab_get_add_bos(v) else []) \
            + self.tokenize(query, add_special=False, parse_special=False) + add_eos \
            + ([int(L.llama_vocab_sep(v))] if L.llama_vocab_get_add_sep(v) else []) \
            + self.tokenize(doc, add_special=False, parse_special=False) + add_eos

    def _pooled(self, kind: str, tokens: list[int], width: int) -> np.ndarray:
        """Decode `tokens` alone in the `kind` context (embeddings or rank; created on first use) and return its
        pooled row of `width` floats."""
        if not tokens:
            raise InvalidRequestError("nothing to embed: empty input")
        self.check_tokens(tokens)
        limit = min(self.n_ctx, self.config.n_batch)
        if len(tokens) > limit:
            raise InvalidRequestError(f"input is {len(tokens)} tokens; embeddings take at most {limit}")
        ctx_attr, batch_attr = ("_ectx", "_ebatch") if kind == "embeddings" else ("_rctx", "_rbatch")
        if getattr(self, ctx_attr) is None:
            setattr(self, ctx_attr, self._new_context(self.config, kind=kind))
            setattr(self, batch_attr, Batch(getattr(self, ctx_attr)))
        ctx, b = getattr(self, ctx_attr), getattr(self, batch_attr)
        L.llama_memory_clear(L.llama_get_memory(ctx), True)
        b.clear()
        for i, tok in enumerate(tokens):
            b.add(tok, i, 0, output=True)
        rc = L.llama_process(ctx, L.LLAMA_PROCESS_TYPE_DECODE, b.ptr)
        self._check_workers()
        if rc != 0:
            raise RuntimeError(f"llama.cpp failed to compute the {kind} output ({rc})")
        return np.ctypeslib.as_array(L.llama_get_embeddings_seq(ctx, 0), shape=(width,)).copy()


def normalize(vec: np.ndarray, mode: int) -> np.ndarray:
    """llama.cpp's `common_embd_normalize`: -1 none, 0 max-abs scaled to the int16 range, 1 taxicab,
    2 euclidean, p > 2 the p-norm."""
    v = vec.astype(np.float64)
    if mode == -1:
        norm = 1.0
    elif mode == 0:
        norm = float(np.abs(v).max(initial=0.0)) / 32760.0
    else:
        norm = float(np.sum(np.abs(v) ** mode) ** (1.0 / mode))
    return (v / norm if norm > 0 else v * 0.0).astype(np.float32)
