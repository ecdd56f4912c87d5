"""Collect an importance matrix with llama.cpp itself, MTP head included.

The same statistics `llama-imatrix` gathers (tools/imatrix/imatrix.cpp `collect_imatrix`): for every matrix
multiplication with a `blk.*` weight, the sum of squared input activations per input column, per expert for
MUL_MAT_ID, with a count of activation rows. They are read in llama.cpp's eval callback (`cb_eval`), installed
through `backend.engine.Engine` on both the target and the MTP context. The engine mirrors every target decode
into the MTP context with the target's hidden rows shifted by one, exactly as speculative decoding does, so the
head's weights (`nextn.eh_proj`, its attention and experts) see the activations they will see when drafting:
something stock `llama-imatrix` (without `--nextn`) never records.
"""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from backend.core.errors import QuantizerError

from .imatrix_file import Imatrix, ImatrixEntry
from .llama_glue import GGMLTensor, op_ids, tensor_f32, tensor_i32, weight_name

if TYPE_CHECKING:
    from backend.engine.llama import Engine

log = logging.getLogger(__name__)
GGML_TYPE_F32 = 0
_MIN_ROWS = 16  # llama-imatrix ignores dense matmuls over fewer than 16 rows (small batches)


class ImatrixCollector:
    """Accumulates `llama-imatrix` statistics from eval-callback calls; `callback` goes into `cb_eval`."""

    def __init__(self, *, process_output: bool = False) -> None:
        import llama_cpp

        ops = op_ids()
        self._mul_mat, self._mul_mat_id = ops["MUL_MAT"], ops["MUL_MAT_ID"]
        self.process_output = process_output
        self.entries: dict[str, ImatrixEntry] = {}
        self.error: BaseException | None = None
        self.callback = llama_cpp.ggml_backend_sched_eval_callback(self._on_eval)

    def _wanted(self, t: GGMLTensor) -> bool:
        if t.op == self._mul_mat_id:
            return True
        if t.op != self._mul_mat:
            return False
        src0, src1 = t.src[0].contents, t.src[1].contents
        if src1.ne[1] < _MIN_ROWS or src1.type != GGML_TYPE_F32:
            return False
        name = weight_name(src0)
        return name.startswith("blk.") or (self.process_output and name == "output.weight")

    def _on_eval(self, t_ptr: int, ask: bool, _user: int) -> bool:
        # An exception must not cross into C (ctypes would print it and return False, which stops the graph).
        try:
            t = ctypes.cast(t_ptr, ctypes.POINTER(GGMLTensor)).contents
            if ask:
                return self._wanted(t)
            if self.error is None:
                self._collect(t)
        except Exception as exc:  # noqa: BLE001 - reported after the decode by `raise_error`
            self.error = exc
        return True

    def _entry(self, name: str, n_mat: int, n_cols: int) -> ImatrixEntry:
        e = self.entries.get(name)
        if e is None:
            e = self.entries[name] = ImatrixEntry(np.zeros((n_mat, n_cols)), np.zeros(n_mat))
        elif e.sums.shape != (n_mat, n_cols):
            raise QuantizerError(f"inconsistent activation shape for {name}: {e.sums.shape} vs {(n_mat, n_cols)}")
        return e

    def _collect(self, t: GGMLTensor) -> None:
        src0, src1 = t.src[0].contents, t.src[1].contents
        name = weight_name(src0)
        x = tensor_f32(src1)  # [ne3, ne2, ne1, ne0]
        if t.op == self._mul_mat_id:
            # ids [n_tokens, n_used] pick the expert of each (token, slot); src1 [n_tokens, ne1, cols]
            ids = tensor_i32(t.src[2].contents)[0, 0]
            n_tok, n_used = ids.shape
            rows = x[0][:, np.arange(n_used) % x.shape[2], :].reshape(n_tok * n_used, -1)
            self._accumulate_experts(self._entry(name, int(src0.ne[2]), rows.shape[1]), ids.reshape(-1), rows)
        else:
            n_mat = int(src0.ne[2] * src0.ne[3])
            e = self._entry(name, n_mat, x.shape[-1])
            sq = np.square(x, dtype=np.float64).sum(axis=2)  # [ne3, ne2, cols]
            for i3 in range(x.shape[0]):
                for i2 in range(x.shape[1]):
                    e.sums[(i3 % src0.ne[3]) * src0.ne[2] + (i2 % src0.ne[2])] += sq[i3, i2]
            e.counts += x.shape[0] * x.shape[1] * x.shape[2] // n_mat
        if not np.all(np.isfinite(self.entries[name].sums)):
            raise QuantizerError(f"non-finite activations in {name}: the model or its input is broken")

    @staticmethod
    def _accumulate_experts(e: ImatrixEntry, experts: np.ndarray, rows: np.ndarray) -> None:
        if experts.size and (experts.min() < 0 or experts.max() >= e.counts.size):
            raise QuantizerError(f"expert id out of range 0..{e.counts.size - 1}")
        order = np.argsort(experts, kind="stable")
        ex_sorted = experts[order]
        starts = np.flatnonzero(np.r_[True, ex_sorted[1:] != ex_sorted[:-1]])
        sums = np.add.reduceat(np.square(rows[order], dtype=np.float64), starts, axis=0)
        e.sums[ex_sorted[starts]] += sums
        e.counts += np.bincount(experts, minlength=e.counts.size)

    def raise_error(self) -> None:
        """Re-raise, in Python, an error that happened inside the callback."""
        if self.error is not None:
            err, self.error = self.error, None
            raise QuantizerError(f"imatrix collection failed: {err}") from err


def chunk_tokens(tokens: list[int], n_ctx: int, bos: int | None, n_chunks: int | None = None) -> list[list[int]]:
    """Split calibration tokens into full `n_ctx` chunks, the first token of each replaced by BOS when the
    model uses one (as llama-imatrix does). A trailing partial chunk is dropped."""
    if n_ctx < 2 * _MIN_ROWS:
        raise QuantizerError(f"chunk size {n_ctx} is too small (minimum {2 * _MIN_ROWS})")
    chunks = [tokens[i:i + n_ctx] for i in range(0, len(tokens) - n_ctx + 1, n_ctx)]
    if n_chunks:
        chunks = chunks[:n_chunks]
    if not chunks:
        raise QuantizerError(f"calibration text is {len(tokens)} tokens, shorter than one chunk of {n_ctx}")
    return [([bos] + c[1:]) if bos is not None else c for c in chunks]


def text_chunks(engine: Engine, text: str, n_ctx: int, n_chunks: int | None = None) -> list[list[int]]:
    """`text` tokenized by the engine's model and cut by `chunk_tokens` (BOS first when the model adds one)."""
    import llama_cpp.llama_cpp as L

    bos = int(L.llama_vocab_bos(engine.vocab)) if L.llama_vocab_get_add_bos(engine.vocab) else None
    return chunk_tokens(engine.tokenize(text, add_special=False, parse_special=False), n_ctx, bos, n_chunks)


def collect_imatrix(
    model: str | Path,
    text: str,
    *,
    dataset: str = "calibration",
    n_ctx: int = 512,
    n_chunks: int | None = None,
    mtp: bool = True,
    process_output: bool = False,
    n_threads: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> Imatrix:
    """Run `model` over `text` in `n_ctx` chunks and return the importance matrix.

    Args:
        model: a GGUF (normally the BF16/F16 source of the tiers).
        text: calibration text.
        dataset: name recorded in `imatrix.datasets`.
        n_ctx: chunk size in tokens (llama-imatrix's default is 512).
        n_chunks: use at most this many chunks.
        mtp: also collect the MTP head when the GGUF has one (mirrored decode).
        process_output: also collect `output.weight` (llama-imatrix `--process-output`).
        n_threads: llama.cpp threads (0 = physical cores).
        progress: called with (chunks done, chunks total).

    Raises:
        QuantizerError: text too short, or a failure inside the eval callback.
        ModelLoadError and friends from the engine.
    """
    from backend.core.gguf_file import read_gguf
    from backend.engine.llama import Engine, EngineConfig

    use_mtp = mtp and read_gguf(model).has_mtp_head
    collector = ImatrixCollector(process_output=process_output)
    cfg = EngineConfig(n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, n_threads=n_threads, mtp=use_mtp,
                       n_draft_max=1 if use_mtp else 0)
    engine = Engine(model, cfg, eval_callback=collector.callback)
    try:
        chunks = text_chunks(engine, text, n_ctx, n_chunks)
        for i, chunk in enumerate(chunks):
            engine.reset()
            # All logits, like llama-imatrix: otherwise the last layer skips the rows of non-output tokens.
            engine.decode_tokens(chunk)
            engine.flush_mirror()  # the MTP head's activations are collected when its context decodes
            collector.raise_error()
            if progress:
                progress(i + 1, len(chunks))
    finally:
        engine.close()
    log.info("imatrix: %d chunks x %d tokens, %d weights (MTP head %s)", len(chunks), n_ctx,
             len(collector.entries), "included" if use_mtp else "absent")
    return Imatrix(collector.entries, [dataset], len(chunks), n_ctx)
