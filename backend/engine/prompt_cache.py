"""Prompt reuse beyond what one sequence still holds: checkpoints, a host-RAM cache, and a cache on disk.

A hybrid model (Gated-DeltaNet recurrent layers beside attention) cannot cut its recurrent state back to an
earlier position: the state is one running summary, not one entry per token. So a prompt that diverges from
what a slot holds would be prefilled from the start. Three things avoid that, as llama-server's context
checkpoints and `--cache-ram` do, and one thing it cannot (a cache that survives restarts on hybrid models):

- `Checkpoint`: a copy of one sequence's recurrent state (llama.cpp's PARTIAL_ONLY sequence state) at a
  position, taken while a prompt is prefilled. Attention KV can be truncated anywhere, so restoring a
  checkpoint and truncating the KV behind it resumes the sequence exactly there.
- `SavedState`: a whole sequence (attention KV + recurrent state + the MTP context's KV, with the hidden row
  the MTP head drafts from next and the sequence's checkpoints), moved to host RAM when its slot is taken by
  another prompt, and restorable into any slot.
- `RamCache`: saved states, bounded in bytes (`cache_ram`), evicted least recently used.
- `DiskCache`: saved states of long prompts written to a directory (`prompt_cache_dir`), keyed by the model
  file's identity and the tokens, atomically (a reader never sees half a file), bounded in bytes; a truncated,
  foreign or corrupt file is refused with a warning and removed.

Pure data and file handling: the llama.cpp calls that take and restore these states are `Engine` methods.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

MiB = 1 << 20


@dataclass(frozen=True)
class CacheConfig:
    """Prompt-reuse settings, with LocalAI's option names (its llama-cpp backend passes them to llama-server).

    `n_checkpoints` (`ctx_checkpoints`): recurrent-state checkpoints kept per slot (0: none). `min_step`
    (`checkpoint_min_step`): the spacing of mid-prompt checkpoints (see `checkpoint_positions`). `ram_mib` (`cache_ram`):
    host-RAM cache for the states of slots taken by other prompts (0: off, -1: unbounded). `idle_slots`
    (`cache_idle_slots`): save idle slots to that cache when a request arrives. `similarity`
    (`slot_prompt_similarity`): a cached state is restored only when its common prefix with the prompt is more
    than this fraction of the prompt (slots are chosen by longest common prefix, any length). `disk_dir`
    (`prompt_cache_dir`): where states of prompts of at least `disk_min_tokens` tokens are kept across
    restarts (empty: off), at most `disk_mib` MiB.
    """

    n_checkpoints: int = 16
    min_step: int = 256
    ram_mib: int = 8192
    idle_slots: bool = True
    similarity: float = 0.1
    disk_dir: str = ""
    disk_mib: int = 8192
    disk_min_tokens: int = 256

    @property
    def ram_bytes(self) -> int | None:
        """The RAM cache's bound in bytes; None when unbounded."""
        return None if self.ram_mib < 0 else self.ram_mib * MiB


@dataclass(frozen=True)
class Checkpoint:
    """One sequence's recurrent state after its first `n_tokens` tokens, and (with MTP) the target's hidden row
    of token `n_tokens - 1`, which the MTP head pairs with the next token.

    A prompt's end (`Sequence.end`) also keeps the logits of its last token as its prefill computed them, so the
    same prompt again samples its first token from that row instead of decoding the last token again in another
    batch shape, whose rounding can flip a near-tie (state is empty there for a model without recurrent layers).
    """

    n_tokens: int
    state: bytes
    h: np.ndarray | None = None
    logits: np.ndarray | None = None

    @property
    def nbytes(self) -> int:
        return len(self.state) + sum(a.nbytes for a in (self.h, self.logits) if a is not None)


@dataclass
class SavedState:
    """A whole sequence as llama.cpp serialises it (target and MTP context), with what our engine keeps beside
    it; restorable into any sequence of a context of the same model and settings."""

    tokens: tuple[int, ...]
    target: bytes
    mtp: bytes = b""
    h: np.ndarray | None = None
    checkpoints: tuple[Checkpoint, ...] = ()
    end: Checkpoint | None = None  # the last prompt's end, with its logits (see Checkpoint)
    # MTP mirror entries not yet decoded into the MTP context: (token, position, hidden row, M-RoPE sections).
    mirror: tuple[tuple[int, int, np.ndarray, np.ndarray | None], ...] = ()
    last_used: float = field(default_factory=time.monotonic)

    @property
    def nbytes(self) -> int:
        return (len(self.target) + len(self.mtp) + (self.h.nbytes if self.h is not None else 0)
                + sum(c.nbytes for c in self.saved_points) + sum(e[2].nbytes + 16 for e in self.mirror))

    @property
    def saved_points(self) -> tuple[Checkpoint, ...]:
        """The checkpoints, then the prompt's end when there is one."""
        return self.checkpoints + ((self.end,) if self.end is not None else ())


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two token sequences."""
    n = min(len(a), len(b))
    if n == 0:
        return 0
    x = np.asarray(a[:n], dtype=np.int64)
    y = np.asarray(b[:n], dtype=np.int64)
    diff = np.flatnonzero(x != y)
    return int(diff[0]) if diff.size else n


# Special tokens that open a chat message in the templates of the models served here (ChatML for Qwen, then Llama 3,
# Gemma, GLM): a next turn re-renders the conversation from one of these on, so a checkpoint just before the last
# ones lets it resume there.
TURN_MARKERS = ("<|im_start|>", "<|start_header_id|>", "<start_of_turn>", "<|user|>", "<|assistant|>")
END_MARGIN = 4  # a checkpoint this many tokens before the prompt's end (llama-server makes the same one)


def checkpoint_positions(prompt: Sequence[int], markers: frozenset[int], min_step: int) -> list[int]:
    """Where a prompt's prefill stops for a checkpoint: every `min_step` tokens (fixed multiples, so a restored
    prompt is prefilled in the same chunks as a cold one), just before each of the last two turn markers (the
    last user message and the assistant's turn: a chat template that drops the answer's reasoning, or an agent
    that rewrites the last message, diverges after them), and `END_MARGIN` tokens before the end."""
    n = len(prompt)
    at = set(range(min_step, n - END_MARGIN, min_step)) if min_step > 0 else set()
    at.update([i for i, t in enumerate(prompt) if t in markers][-2:])
    at.add(n - END_MARGIN)
    return sorted(p for p in at if 0 < p < n)


def thin(checkpoints: list[Checkpoint], limit: int) -> list[Checkpoint]:
    """Keep at most `limit` checkpoints (sorted by position): drop the one closest to its predecessor until they
    fit, so the survivors stay spread over the prompt; the newest is always kept (the next turn resumes there)."""
    kept = sorted(checkpoints, key=lambda c: c.n_tokens)
    while len(kept) > max(limit, 0):
        if limit <= 0:
            return []
        gaps = [kept[i].n_tokens - kept[i - 1].n_tokens for i in range(1, len(kept) - 1)]
        drop = 1 + int(np.argmin(gaps)) if gaps else 0
        del kept[drop]
    return kept


# ------------------------------------------------------------------------------------------- RAM


def available_ram() -> int:
    """Bytes of system memory available to new allocations (psutil), or unbounded when it cannot tell."""
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except (ImportError, OSError):
        return 1 << 62


class RamCache:
    """Saved sequence states in host RAM, at most `limit` bytes (None: unbounded), least recently used evicted.

    Under memory pressure the cache gives way: a state is kept only while `keep_free` bytes of system memory stay
    available after it (older entries are evicted first), so a full cache never pushes the model into swap.
    Used from the scheduler's thread only.
    """

    def __init__(self, limit: int | None, *, keep_free: int = 2 << 30,
                 available: Callable[[], int] = available_ram) -> None:
        self.limit = limit
        self.keep_free = keep_free
        self._available = available
        self.entries: list[SavedState] = []
        self.evictions = 0

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self.entries)

    def add(self, state: SavedState) -> bool:
        """Keep `state` (dropping entries whose tokens it extends: it serves every prompt they serve); False when it
        alone is larger than the bound."""
        if self.limit is not None and state.nbytes > self.limit:
            return False
        self.entries = [e for e in self.entries if not _is_prefix(e.tokens, state.tokens)]
        while self.entries and (self.limit is not None and self.nbytes + state.nbytes > self.limit
                                or self._available() - state.nbytes < self.keep_free):
            self.entries.remove(min(self.entries, key=lambda e: e.last_used))
            self.evictions += 1
        if self._available() - state.nbytes < self.keep_free:
            return False
        self.entries.append(state)
        return True

    def best(self, prompt: Sequence[int]) -> tuple[SavedState | None, int]:
        """The entry sharing the longest prefix with `prompt`, and that length (ties: the most recent)."""
        best, n_best = None, 0
        for e in self.entries:
            n = common_prefix(e.tokens, prompt)
            if n > n_best or (n == n_best and n > 0 and best is not None and e.last_used > best.last_used):
                best, n_best = e, n
        return best, n_best

    def touch(self, state: SavedState) -> None:
        state.last_used = time.monotonic()

    def clear(self) -> None:
        self.entries.clear()


def _is_prefix(a: Sequence[int], b: Sequence[int]) -> bool:
    return len(a) <= len(b) and common_prefix(a, b) == len(a)


# ------------------------------------------------------------------------------------------- disk

_MAGIC = b"APEXMTP-PROMPT-CACHE\n"
_VERSION = 2
_SUFFIX = ".apc"
_HEAD = struct.Struct("<II")  # format version, header length


class CacheFileError(ValueError):
    """A prompt-cache file that cannot be used: truncated, corrupt, of another version or another model."""


def model_identity(path: str | Path, settings: dict[str, object]) -> str:
    """What a saved state depends on: the model file (its size and its first and last MiB, which hold the
    header and the last tensors, so a re-quantized or edited file differs) and the context settings that shape
    the serialised state (KV types, V layout, MTP), and this file format's version, so that processes of two
    apexmtp versions sharing a directory do not read each other's files, nor refuse and delete them (the
    directory's size bound still evicts the least recently used file of any identity). 32 hex digits."""
    p = Path(path)
    size = p.stat().st_size
    h = hashlib.sha256()
    h.update(f"format {_VERSION} size {size}".encode())
    with p.open("rb") as f:
        h.update(f.read(MiB))
        f.seek(max(0, size - MiB))
        h.update(f.read(MiB))
    h.update(json.dumps(settings, sort_keys=True).encode())
    return h.hexdigest()[:32]


def tokens_key(tokens: Sequence[int]) -> str:
    return hashlib.sha256(np.asarray(tokens, dtype=np.int32).tobytes()).hexdigest()[:32]


def encode(state: SavedState, identity: str) -> bytes:
    """A saved state as one file's bytes: magic, version, a JSON header (identity, part sizes, sha256 of the
    payload), then the payload (tokens, target state, MTP state, hidden row, checkpoints, the prompt's end)."""
    parts = [np.asarray(state.tokens, dtype=np.int32).tobytes(), state.target, state.mtp, _row(state.h)]
    ckpts = []
    for c in state.saved_points:
        parts += [c.state, _row(c.h), _row(c.logits)]
        ckpts.append({"n_tokens": c.n_tokens, "state": len(c.state), "h": len(_row(c.h)),
                      "logits": len(_row(c.logits))})
    mirror = _mirror_bytes(state.mirror)
    parts.append(mirror)
    payload = b"".join(parts)
    header = json.dumps({
        "identity": identity, "n_tokens": len(state.tokens), "target": len(state.target), "mtp": len(state.mtp),
        "h": len(_row(state.h)), "checkpoints": ckpts, "end": state.end is not None, "mirror": len(state.mirror), "mirror_bytes": len(mirror),
        "sha256": hashlib.sha256(payload).hexdigest(),
    }).encode()
    return _MAGIC + _HEAD.pack(_VERSION, len(header)) + header + payload


def _mirror_bytes(mirror: Sequence[tuple[int, int, np.ndarray, np.ndarray | None]]) -> bytes:
    """Pending mirror entries as (token, position, has-sections) int32 triples, the hidden rows (float32), then the
    4 M-RoPE sections of the entries that have them (image rows)."""
    if not mirror:
        return b""
    head = np.array([(t, p, s is not None) for t, p, _, s in mirror], dtype=np.int32)
    rows = np.stack([np.asarray(h, dtype=np.float32) for _, _, h, _ in mirror])
    sections = [np.asarray(s, dtype=np.int32) for *_, s in mirror if s is not None]
    return head.tobytes() + rows.tobytes() + (np.stack(sections).tobytes() if sections else b"")


def _mirror_entries(data: bytes, n: int) -> tuple[tuple[int, int, np.ndarray, np.ndarray | None], ...]:
    if n == 0:
        return ()
    head = np.frombuffer(data[:12 * n], dtype=np.int32).reshape(n, 3)
    width, rest = divmod(len(data) - 12 * n - 16 * int(head[:, 2].sum()), 4 * n)
    if width <= 0 or rest:
        raise CacheFileError("inconsistent mirror entries")
    rows = np.frombuffer(data[12 * n:12 * n + 4 * n * width], dtype=np.float32).reshape(n, width)
    sections = iter(np.frombuffer(data[12 * n + 4 * n * width:], dtype=np.int32).reshape(-1, 4))
    return tuple((int(t), int(p), rows[i].copy(), next(sections).copy() if flag else None)
                 for i, (t, p, flag) in enumerate(head))


def _row(h: np.ndarray | None) -> bytes:
    return b"" if h is None else np.asarray(h, dtype=np.float32).tobytes()


def _unrow(b: bytes) -> np.ndarray | None:
    return np.frombuffer(b, dtype=np.float32).copy() if b else None


def read_header(data: bytes, identity: str) -> tuple[dict, int]:
    """Check magic, version and identity; return the header and where the payload starts."""
    if not data.startswith(_MAGIC) or len(data) < len(_MAGIC) + _HEAD.size:
        raise CacheFileError("not a prompt-cache file (bad magic)")
    version, n_header = _HEAD.unpack_from(data, len(_MAGIC))
    if version != _VERSION:
        raise CacheFileError(f"prompt-cache format {version}, this version reads {_VERSION}")
    start = len(_MAGIC) + _HEAD.size
    try:
        header = json.loads(data[start:start + n_header])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CacheFileError(f"unreadable header ({exc})") from None
    if not isinstance(header, dict) or header.get("identity") != identity:
        raise CacheFileError("written for another model file or other context settings")
    return header, start + n_header


def decode(data: bytes, identity: str) -> SavedState:
    """The inverse of `encode`; raises `CacheFileError` for anything but an intact file of this model."""
    header, at = read_header(data, identity)
    payload = data[at:]
    try:
        n_tok = int(header["n_tokens"])
        sizes = [4 * n_tok, int(header["target"]), int(header["mtp"]), int(header["h"])]
        ckpts = [(int(c["n_tokens"]), int(c["state"]), int(c["h"]), int(c["logits"])) for c in header["checkpoints"]]
        has_end = bool(header["end"])
        n_mirror, mirror_bytes = int(header["mirror"]), int(header["mirror_bytes"])
        digest = str(header["sha256"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CacheFileError(f"incomplete header ({exc})") from None
    expected = sum(sizes) + sum(sum(c[1:]) for c in ckpts) + mirror_bytes
    if len(payload) != expected:
        raise CacheFileError(f"truncated: {len(payload)} payload bytes, the header says {expected}")
    if hashlib.sha256(payload).hexdigest() != digest:
        raise CacheFileError("corrupt: the payload does not match its sha256")
    view = memoryview(payload)
    pos = 0

    def take(n: int) -> bytes:
        nonlocal pos
        out = bytes(view[pos:pos + n])
        pos += n
        return out

    tokens = tuple(int(t) for t in np.frombuffer(take(sizes[0]), dtype=np.int32))
    target, mtp, h = take(sizes[1]), take(sizes[2]), _unrow(take(sizes[3]))
    checkpoints = [Checkpoint(n, take(s), _unrow(take(hn)), _unrow(take(ln))) for n, s, hn, ln in ckpts]
    end = checkpoints.pop() if has_end and checkpoints else None
    mirror = _mirror_entries(take(mirror_bytes), n_mirror)
    if not target or any(c.n_tokens > n_tok for c in checkpoints) or any(not 0 <= e[1] < n_tok for e in mirror) \
            or (end is not None and (end.n_tokens > n_tok or end.logits is None)):
        raise CacheFileError("inconsistent: no target state, or a checkpoint or mirror entry beyond the tokens")
    return SavedState(tokens=tokens, target=target, mtp=mtp, h=h, checkpoints=tuple(checkpoints), end=end,
                      mirror=mirror)


class DiskCache:
    """Saved states of long prompts in `directory`, for one model identity, at most `limit` bytes in all.

    Lookups and reads happen on the scheduler's thread; writes go to one background thread (the caller hands
    over bytes it already copied out of llama.cpp) and land atomically (a temporary file renamed into place), so
    concurrent processes sharing the directory never read a half-written file. The index of what is on disk
    (tokens per file) is read once, then kept up to date by this process's own writes and removals.
    """

    def __init__(self, directory: str | Path, identity: str, limit: int) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.identity = identity
        self.limit = limit
        self._index: dict[Path, tuple[int, ...]] | None = None
        self._lock = threading.Lock()
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prompt-cache")
        self._writes: list[Future] = []
        self.hits = self.misses = self.refused = self.written = 0

    def _path(self, tokens: Sequence[int]) -> Path:
        return self.dir / f"{self.identity[:16]}-{tokens_key(tokens)}{_SUFFIX}"

    def index(self) -> dict[Path, tuple[int, ...]]:
        """Files of this identity and their tokens (headers and token arrays only are read)."""
        with self._lock:
            if self._index is None:
                self._index = {}
                for p in sorted(self.dir.glob(f"{self.identity[:16]}-*{_SUFFIX}")):
                    tokens = self._peek(p)
                    if tokens is not None:
                        self._index[p] = tokens
            return dict(self._index)

    def _peek(self, path: Path) -> tuple[int, ...] | None:
        try:
            with path.open("rb") as f:
                head = f.read(len(_MAGIC) + _HEAD.size + 65536)
                header, at = read_header(head, self.identity)
                n = int(header["n_tokens"])
                f.seek(at)
                raw = f.read(4 * n)
            if len(raw) != 4 * n:
                raise CacheFileError("truncated token array")
            return tuple(int(t) for t in np.frombuffer(raw, dtype=np.int32))
        except (OSError, CacheFileError, KeyError, TypeError, ValueError) as exc:
            self._refuse(path, exc)
            return None

    def _refuse(self, path: Path, exc: BaseException) -> None:
        log.warning("prompt cache: ignoring %s: %s (it is removed and will be rebuilt)", path.name, exc)
        self.refused += 1
        try:
            path.unlink()
        except OSError:
            pass

    def best(self, prompt: Sequence[int]) -> tuple[Path | None, int]:
        """The file sharing the longest prefix with `prompt`, and that length."""
        best, n_best = None, 0
        for p, tokens in self.index().items():
            n = common_prefix(tokens, prompt)
            if n > n_best:
                best, n_best = p, n
        return best, n_best

    def load(self, path: Path) -> SavedState | None:
        """Read and check one file; None (with a warning, the file removed) when it cannot be used."""
        try:
            state = decode(path.read_bytes(), self.identity)
        except (OSError, CacheFileError) as exc:
            self._refuse(path, exc)
            with self._lock:
                if self._index is not None:
                    self._index.pop(path, None)
            self.misses += 1
            return None
        os.utime(path)  # most recently used: the bound evicts by modification time
        self.hits += 1
        return state

    def store(self, state: SavedState) -> Future:
        """Write `state` in the background (replacing files whose tokens it extends); returns the write's future."""
        fut = self._writer.submit(self._write, state)
        self._writes = [f for f in self._writes if not f.done()] + [fut]
        return fut

    def _write(self, state: SavedState) -> Path:
        path = self._path(state.tokens)
        data = encode(state, self.identity)
        fd, tmp = tempfile.mkstemp(dir=self.dir, prefix=".tmp-", suffix=_SUFFIX)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        self.written += 1
        index = self.index()
        with self._lock:
            assert self._index is not None
            for p, tokens in index.items():
                if p != path and _is_prefix(tokens, state.tokens):
                    self._index.pop(p, None)
                    try:
                        p.unlink()
                    except OSError:
                        pass
            self._index[path] = tuple(state.tokens)
        self._enforce_limit()
        return path

    def _enforce_limit(self) -> None:
        """Remove the least recently used files (by modification time) until the directory fits its bound."""
        files = []
        for p in self.dir.glob(f"*{_SUFFIX}"):
            if p.name.startswith(".tmp-"):
                continue
            try:
                st = p.stat()
            except OSError:
                continue
            files.append((st.st_mtime, st.st_size, p))
        total = sum(size for _, size, _ in files)
        for _, size, p in sorted(files):
            if total <= self.limit:
                break
            try:
                p.unlink()
            except OSError:
                continue
            total -= size
            with self._lock:
                if self._index is not None:
                    self._index.pop(p, None)

    @property
    def nbytes(self) -> int:
        return sum(p.stat().st_size for p in list(self.index()) if p.exists())

    def flush(self, timeout: float | None = None) -> None:
        """Wait for the writes handed over so far (a failed write is logged, not raised)."""
        for fut in list(self._writes):
            try:
                fut.result(timeout)
            except OSError as exc:
                log.warning("prompt cache: a write to %s failed: %s", self.dir, exc)
        self._writes = []

    def close(self) -> None:
        self.flush()
        self._writer.shutdown(wait=True)
