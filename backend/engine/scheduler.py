"""Continuous batching: every busy slot advances in one batched step, with MTP speculation in each slot.

A `Scheduler` owns an `Engine` with N sequences (slots). Requests are admitted FIFO into free slots (the one
holding the longest prefix of the prompt first, so a chat's next turn reuses its KV). Each step:

1. every decoding slot gets drafts: from its own tokens by n-gram lookup where that finds a match (ngram.py: no
   model call), else from the MTP head (or a separate draft model, draft_model.py), k tokens for all such slots,
   one batched decode per draft position;
2. ONE target decode holds every decoding slot's verify row `[y, d1..dk]` and a chunk of each prompt being
   prefilled, so a long prompt never stalls the slots that are generating;
3. each slot's own sampler picks a token from each of its rows; drafts are kept while they equal that pick, and
   the slot rolls back to its last kept token (mtp-engine.md §1.8-1.9);
4. accepted tokens go through the request's `Output` (stop strings, EOS, logprobs) and out to its sink.

Every emitted token is therefore the target's own choice under that slot's sampler: greedy and seeded output is
the same alone or beside other requests (up to batched-kernel float differences on near-tied logits). The
scheduler's thread is the only one that decodes; `submit`, `cancel` and `call` are safe from any thread, and a
waiting request costs nothing until a slot frees up.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Any

import numpy as np

from ..core.errors import ContextOverflowError, EngineClosedError, InvalidRequestError
from .draft_model import DraftModel
from .generation import Chunk, GenerationRequest, Inspect, Output, Result, make_logprobs
from .llama import DecodeError, Engine, Row
from .ngram import NgramDrafter, NgramDrafting
from .prompt_cache import (
    CacheConfig,
    Checkpoint,
    DiskCache,
    RamCache,
    SavedState,
    checkpoint_positions,
    common_prefix,
    model_identity,
)
from .sampling import Sampler
from .speculative import Acceptance, DraftController, SpecConfig
from .threads import ThreadGovernor

log = logging.getLogger(__name__)

_LLAMA_THREAD: ThreadPoolExecutor | None = None
_LLAMA_THREAD_LOCK = threading.Lock()


def llama_thread() -> ThreadPoolExecutor:
    """The process's one thread for llama.cpp's heavy work: loading a model, serving it (`Scheduler.run`), freeing it.

    ggml's CPU backend (OpenMP) keeps a team of worker threads per thread that computes, and glibc an allocation
    arena per thread: doing all of it on one long-lived thread keeps both the same across model reloads.
    """
    global _LLAMA_THREAD
    with _LLAMA_THREAD_LOCK:
        if _LLAMA_THREAD is None:
            _LLAMA_THREAD = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llama")
        return _LLAMA_THREAD


# A cached state is restored only when it holds this many more prompt tokens than the slot: restoring copies the
# whole state, and a handful of tokens is cheaper to prefill (it also keeps a slot's KV where it was computed).
_MIN_RESTORE_GAIN = 32
IDLE_GAP_S = 0.25  # no step for this long: the scheduler was idle (steps follow each other at once while busy)
IDLE_MIRROR_CHUNK = 32  # MTP mirror entries an idle server decodes at a time (a few ms: a new request barely waits)

Event = Chunk | Result | BaseException  # what a sink receives: chunks, then a Result or the error that ended it
Sink = Callable[[Event], None]


class Ticket:
    """One submitted request, from `submit` until its sink has received a `Result` or an error."""

    def __init__(self, req: GenerationRequest, sampler: Sampler, sink: Sink, inspect: Inspect | None) -> None:
        self.req = req
        self.sampler = sampler
        self.sink = sink
        self.inspect = inspect
        self.result = Result(n_prompt=req.n_prompt)
        self.cancelled = False
        self.t_submit = time.perf_counter()

    def cancel(self) -> None:
        """Stop at the next step boundary (the scheduler's `cancel` also wakes it)."""
        self.cancelled = True


@dataclass
class Slot:
    """One sequence of the engine and the request it is serving."""

    seq: int
    ticket: Ticket | None = None
    todo: list[int] = field(default_factory=list)  # prompt tokens still to decode
    y: int | None = None  # the last emitted token, sampled but not yet decoded
    acc: Acceptance | None = None
    ngram: NgramDrafter | None = None  # the request's n-gram drafter, when the model drafts by n-gram
    out: Output | None = None
    max_tokens: int = 0
    t_admit: float = 0.0
    t_first: float = 0.0
    last_used: float = 0.0
    n_prompt: int = 0  # the request's prompt length
    checkpoint_at: list[int] = field(default_factory=list)  # prefill positions to checkpoint the recurrent state at
    saved: bool = False  # what the sequence holds is in the RAM cache already


@dataclass
class Draft:
    """A slot's drafts in one step: the tokens its verify row carries after y, where the first `n_real` came from
    ("ngram", "mtp", "draft"; "" for none), the rest filler that pads the row to the step's common length."""

    tokens: list[int] = field(default_factory=list)
    origin: str = ""
    n_real: int = 0


@dataclass
class Metrics:
    """Totals since the model was loaded, and the last finished request (GetMetrics, /metrics)."""

    requests: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    drafted: int = 0
    accepted: int = 0
    last: Result | None = None
    cached_tokens: int = 0  # prompt tokens not prefilled, from any source
    prefilled_tokens: int = 0  # prompt tokens decoded
    cache_hits: dict[str, int] = field(default_factory=lambda: {"slot": 0, "checkpoint": 0, "ram": 0, "disk": 0})
    cache_misses: int = 0  # requests that reused nothing


class Scheduler:
    """Serves requests on an engine's slots with continuous batching; owns the engine and frees it on close."""

    def __init__(self, engine: Engine, spec: SpecConfig, *, name: str = "", default_seed: int | None = None,
                 cache: CacheConfig | None = None, draft_model: DraftModel | None = None) -> None:
        self.engine = engine
        # What drafts with a model: a separate draft model (draft-simple) or the GGUF's own MTP head.
        self.draft_model = draft_model
        self.model_origin = "draft" if draft_model is not None else "mtp"
        self.spec = spec
        self.cache = cache or CacheConfig()
        self.ram = RamCache(self.cache.ram_bytes) if self.cache.ram_mib != 0 else None
        self.disk = DiskCache(self.cache.disk_dir, model_identity(engine.path, engine.state_settings),
                              self.cache.disk_mib * (1 << 20)) if self.cache.disk_dir else None
        self.name = name or engine.path
        self.default_seed = default_seed  # ModelOptions.Seed: used by requests that set none
        self.controller = (
            DraftController(spec.n_max, adaptive=spec.adaptive)
            if (engine.mtp_enabled or draft_model is not None) and spec.n_max > 0 else None
        )
        self.ngram = NgramDrafting(spec) if spec.ngram else None
        top = max(engine.n_threads, engine.n_threads_batch)
        self._step_end = 0.0  # when the last step ended: a longer gap before the next one is idle time
        self._redo: list[Row] = []  # this step's rows rolled back from a snapshot, to decode again after verifying
        self._model_drafted = False  # whether it drafted the step before: its drafter is then in step
        self.threads = ThreadGovernor(top) if engine.config.adaptive_threads and top > 1 else None
        if self.ngram and spec.ngram_max > engine.config.n_draft_max:
            raise InvalidRequestError(f"the engine verifies at most {engine.config.n_draft_max} drafts; "
                                      f"{spec.ngram} drafts up to {spec.ngram_max}")
        self.origins = (("ngram",) if self.ngram else ()) + ((self.model_origin,) if self.controller else ())
        self.slots = [Slot(i) for i in range(engine.n_seq)]
        self.metrics = Metrics()
        self._pending: deque[Ticket] = deque()
        self._jobs: deque[tuple[Callable[[Engine], Any], Future]] = deque()
        self._cv = threading.Condition()
        self._closing: BaseException | None = None
        self._running = False
        self._stopped = threading.Event()
        self._driving = threading.Lock()  # one thread steps the engine at a time (`run` or `run_until_idle`)

    # -- any thread --------------------------------------------------------------------------------

    @cached_property
    def eog_tokens(self) -> tuple[int, ...]:
        return tuple(t for t in range(self.engine.n_vocab) if self.engine.is_eog(t))

    def submit(self, req: GenerationRequest, sink: Sink) -> Ticket:
        """Queue a request; `sink` then receives its chunks and finally its `Result` (or the error that ended it).

        Raises `InvalidRequestError` (bad values, a grammar llama.cpp cannot parse, a prompt longer than a slot's
        context) and `EngineClosedError` (the model is being unloaded) before anything is queued.
        """
        if req.max_tokens <= 0:
            raise InvalidRequestError(f"max tokens must be positive, got {req.max_tokens}")
        if not req.prompt:
            raise InvalidRequestError("empty prompt: nothing to condition on")
        if req.n_prompt >= self.engine.n_ctx:  # an image's rows each take a KV cell
            raise ContextOverflowError(req.n_prompt, self.engine.n_ctx)
        self.engine.check_tokens(req.text_tokens)
        keys = {img.key for img in req.images}
        if len(req.text_tokens) + sum(img.n_pos for img in req.images) != len(req.prompt) or \
                any(t < 0 and t not in keys for t in req.prompt):
            raise InvalidRequestError("the prompt's image positions do not match its images")
        if req.prompt[-1] < 0:
            raise InvalidRequestError("a prompt cannot end with an image: the model needs text after it")
        sampling = req.sampling
        if sampling.seed is None and self.default_seed is not None:
            sampling = replace(sampling, seed=self.default_seed)
        if req.ignore_eos:
            bias = dict(sampling.logit_bias)
            bias.update({t: -math.inf for t in self.eog_tokens})
            sampling = replace(sampling, logit_bias=bias)
        if sum(1 for b in sampling.logit_bias.values() if b == -math.inf) >= self.engine.n_vocab:
            raise InvalidRequestError("logit_bias (with IgnoreEOS) bans every token of the vocabulary")
        inspect = make_logprobs(req.logprobs) if req.logprobs is not None else None
        with self._cv:  # the engine cannot be freed while the sampler is made against its vocabulary
            if self._closing is not None:
                raise EngineClosedError(f"{self.name} is being unloaded: {self._closing}")
            sampler = Sampler(sampling, self.engine.vocab, self.engine.n_vocab)
            ticket = Ticket(req, sampler, sink, inspect)
            self._pending.append(ticket)
            self._cv.notify()
        return ticket

    def cancel(self, ticket: Ticket) -> None:
        """Stop a request at the next step boundary; its slot is free for the next one."""
        ticket.cancel()
        with self._cv:
            self._cv.notify()

    def call(self, fn: Callable[[Engine], Any]) -> Future:
        """Run `fn(engine)` on the scheduler's thread between two steps (embeddings share the engine)."""
        fut: Future = Future()
        with self._cv:
            if self._closing is not None:
                fut.set_exception(EngineClosedError(f"{self.name} is being unloaded: {self._closing}"))
                return fut
            self._jobs.append((fn, fut))
            self._cv.notify()
        if not self._running:
            with self._driving:
                self._run_jobs()
        return fut

    @property
    def busy_slots(self) -> int:
        return sum(1 for s in self.slots if s.ticket is not None)

    @property
    def queue_depth(self) -> int:
        return len(self._pending)

    def close(self, reason: BaseException | None = None, timeout: float | None = None) -> None:
        """End every open request with `reason`, stop the loop, then free the samplers and the engine."""
        with self._cv:
            if self._closing is None:
                self._closing = reason or EngineClosedError(f"{self.name} was unloaded")
            running = self._running
            self._cv.notify_all()
        if running:
            self._stopped.wait(timeout)
        else:
            with self._driving:
                self._drain()
        if self.disk is not None:
            self._persist_slots()
            self.disk.close()
        if self.ram is not None:
            self.ram.clear()
        self.engine.close()
        if self.draft_model is not None:
            self.draft_model.close()

    def _persist_slots(self) -> None:
        """Write the slots' long prompts to the disk cache before the engine goes (a restart resumes them)."""
        try:
            for s in self.slots:
                if not self.engine.closed and self.engine.n_past(s.seq) >= self.cache.disk_min_tokens:
                    state = self.engine.save_state(s.seq)
                    if state is not None:
                        self.disk.store(state)
        except (RuntimeError, OSError) as exc:
            log.warning("%s: could not save the slots to the prompt cache: %s", self.name, exc)

    # -- the scheduler's thread --------------------------------------------------------------------

    def run(self) -> None:
        """Serve until `close` (for one long-lived thread); open requests end with the close reason."""
        self._running = True
        try:
            self._driving.acquire()
            while True:
                backlog: int | None = None
                with self._cv:
                    while self._closing is None and not self._has_work() and (backlog := self._mirror_backlog()) is None:
                        self._cv.wait()
                    if self._closing is not None:
                        break
                    idle = not self._has_work()  # it stopped waiting for the backlog, not for work
                if idle and backlog is not None:
                    self._flush_idle(backlog)
                    continue
                self._run_jobs()
                self._guarded_step()
        finally:
            self._drain()
            self._driving.release()
            self._stopped.set()

    def _has_work(self) -> bool:
        return bool(self._jobs or self._pending or self.busy_slots)

    def _mirror_backlog(self) -> int | None:
        """A free slot whose MTP mirror entries are still queued (the prompt tail since the last full chunk, when its
        request never drafted after it), or None."""
        return next((s.seq for s in self.slots if s.ticket is None and self.engine.seqs[s.seq].mirror), None) \
            if not self.engine.closed and self.engine.mtp_enabled else None

    def _flush_idle(self, seq: int) -> None:
        """Decode some of a free slot's queued mirror entries while nothing else is waiting, `IDLE_MIRROR_CHUNK` at a
        time so that a request arriving meanwhile waits a few milliseconds: a conversation's next turn then does not
        pay for them in its time to first token."""
        try:
            self.engine.flush_mirror([seq], limit=IDLE_MIRROR_CHUNK)
        except DecodeError as exc:  # the engine reset that sequence: its next request prefills again
            log.warning("%s: slot %d: %s", self.name, seq, exc)
        except Exception:  # a bug: the loop keeps serving, the slot starts over (entries already taken are gone)
            log.exception("%s: slot %d: mirroring while idle failed", self.name, seq)
            if not self.engine.closed:
                self.engine.reset(seq)

    def run_until_idle(self) -> None:
        """Drive the loop on the calling thread until every submitted request has finished (in-process use)."""
        with self._driving:
            while self._has_work():
                self._run_jobs()
                self._guarded_step()

    def _run_jobs(self) -> None:
        while True:
            with self._cv:
                if not self._jobs:
                    return
                fn, fut = self._jobs.popleft()
            try:
                fut.set_result(fn(self.engine))
            except BaseException as exc:  # noqa: BLE001 - not handled here: the caller's future raises it
                fut.set_exception(exc)

    def _guarded_step(self) -> None:
        try:
            self.step()
        except DecodeError as exc:
            log.error("%s: %s", self.name, exc)
            for s in self.slots:
                if s.ticket is not None and s.seq in exc.seqs:
                    self._end(s, error=exc)
        except Exception as exc:  # a bug, or an engine that cannot go on: fail the requests in flight, keep serving
            if isinstance(exc, EngineClosedError):  # e.g. a lost RPC worker: no traceback, it is not a bug
                log.error("%s: %s", self.name, exc)
            else:
                log.exception("%s: generation step failed", self.name)
            for s in self.slots:
                if s.ticket is not None:
                    self._end(s, error=exc)
            self.engine.reset()

    def _drain(self) -> None:
        reason = self._closing or EngineClosedError(f"{self.name} was unloaded")
        with self._cv:
            pending, self._pending = list(self._pending), deque()
            jobs, self._jobs = list(self._jobs), deque()
        for ticket in pending:
            ticket.sampler.close()
            ticket.sink(reason)
        for _, fut in jobs:
            fut.set_exception(reason)
        for s in self.slots:
            if s.ticket is not None:
                self._end(s, error=reason)

    # -- one step ------------------------------------------------------------------------------------

    def step(self) -> bool:
        """Admit, draft, decode and verify once for every busy slot; False when there was nothing to do."""
        self._admit()
        for s in self.slots:
            if s.ticket is not None and s.ticket.cancelled:
                self._end(s, reason="cancelled")
        self._prefill_images()
        decoding = [s for s in self.slots if s.ticket is not None and s.y is not None]
        prefilling = sorted((s for s in self.slots if s.ticket is not None and s.y is None), key=lambda s: s.t_admit)
        if not decoding and not prefilling:
            return False
        engine = self.engine
        resumed = time.perf_counter() - self._step_end > IDLE_GAP_S
        if self.threads is not None and (n := self.threads.poll(resumed=resumed)) is not None:
            engine.set_threads(n)
            if self.draft_model is not None:
                self.draft_model.set_threads(n)
            log.info("%s: computing with %d of %d threads: %s", self.name, n, self.threads.configured,
                     "other processes hold the other cores" if n < self.threads.configured else "the cores are free")
        t0, m0 = time.perf_counter(), self._deferred_seconds()
        in_step = self._model_drafted
        drafts, k_model = self._drafts(decoding)
        self._model_drafted = k_model > 0
        rows: list[tuple[Slot, Row]] = [(s, Row(s.seq, [s.y, *drafts[s.seq].tokens])) for s in decoding]
        budget = engine.n_batch - sum(len(r.tokens) for _, r in rows)
        for s in prefilling:
            if budget <= 0:
                break
            chunk = s.todo[:min(budget, self._until_checkpoint(s))]
            chunk = chunk[:next((i for i, t in enumerate(chunk) if t < 0), len(chunk))]  # up to the next image
            if not chunk:
                continue
            rows.insert(0, (s, Row(s.seq, chunk, "last" if len(chunk) == len(s.todo) else "none")))
            budget -= len(chunk)
        # A recurrent state rolls back in place only n_rs_seq tokens: longer rows (n-gram drafts) get a snapshot.
        before = {s.seq: engine.snapshot(s.seq) for s, r in rows
                  if r.logits == "all" and engine.recurrent and len(r.tokens) - 1 > engine.n_rs_seq}
        engine.decode([r for _, r in rows])
        prefilled = False
        self._redo.clear()
        for s, row in rows:
            try:
                if row.logits != "all":
                    prefilled = True
                    del s.todo[:len(row.tokens)]
                    self.metrics.prefilled_tokens += len(row.tokens)
                    self._maybe_checkpoint(s)
                    if self.draft_model is not None:
                        self.draft_model.follow(s.seq)
                    if not s.todo:
                        engine.record_end(s.seq, row.last, self.cache.n_checkpoints)
                        self._first_token(s, engine.logits(row.last))
                else:
                    self._verify(s, row, drafts[s.seq], before.get(s.seq))
            except InvalidRequestError as exc:  # this request cannot go on (its grammar allows nothing): only it
                self._end(s, error=exc)
        if self._redo:  # rows rolled back from a snapshot: their kept tokens again, now that every row was read
            engine.decode(self._redo)
        # The controller times model-drafted steps only: an n-gram draft's length is not its choice. Catching the
        # drafter up with steps it did not draft is not what this step's k costs; keeping it in step while it
        # drafts (mirroring the kept tokens) is.
        if self.controller is not None and decoding and not prefilled and \
                all(d.origin != "ngram" for d in drafts.values()):
            k = max(len(d.tokens) for d in drafts.values())
            catchup = 0.0 if in_step else self._deferred_seconds() - m0
            self.controller.observe(len(decoding), k, time.perf_counter() - t0 - catchup)
        self._step_end = time.perf_counter()
        return True

    def _deferred_seconds(self) -> float:
        """Time spent so far bringing the drafter up to date with what the target decoded (the MTP context's
        deferred mirror, a draft model's catch-up decodes)."""
        return self.engine.mirror_seconds + (self.draft_model.catchup_seconds if self.draft_model else 0.0)

    def _prefill_images(self) -> None:
        """Decode the images that come next in a prefilling slot's prompt, each as its own target decode (an image
        row is an embedding, which llama.cpp takes only in a batch of embeddings)."""
        for s in self.slots:
            while s.ticket is not None and s.y is None and s.todo and s.todo[0] < 0:
                image = next(img for img in s.ticket.req.images if img.key == s.todo[0])
                try:
                    self.engine.decode_image(s.seq, image)
                except (DecodeError, InvalidRequestError) as exc:
                    log.error("%s: slot %d: %s", self.name, s.seq, exc)
                    self._end(s, error=exc)
                    break
                del s.todo[:image.n_pos]

    def _admit(self) -> None:
        """Pending requests into free slots, FIFO. Each takes the free slot holding most of its prompt, unless the
        RAM or disk cache holds more of it (then that state is restored into the slot); a slot whose contents
        the new prompt would mostly discard is saved to the RAM cache first."""
        while True:
            with self._cv:
                free = [s for s in self.slots if s.ticket is None]
                if not free or not self._pending:
                    return
                ticket = self._pending.popleft()
            if ticket.cancelled:
                ticket.sampler.close()
                ticket.result.finish_reason = "cancelled"
                ticket.sink(ticket.result)
                continue
            prompt = ticket.req.prompt
            t_admit = time.perf_counter()  # a restore counts as prompt time, as in llama-server's prompt_ms
            slot = self._pick_slot(free, prompt)
            source = self._restore_from_cache(slot, prompt)
            n_slot = common_prefix(self.engine.seqs[slot.seq].tokens, prompt)
            if source is None and n_slot < len(self.engine.seqs[slot.seq].tokens) // 2:
                self._stash(slot)  # most of it is about to go: keep it for the conversation's return
            restores = self.engine.checkpoint_restores
            n_keep = self.engine.keep_prefix(slot.seq, prompt, whole=True)
            if source is None and n_keep:
                source = "checkpoint" if self.engine.checkpoint_restores > restores else "slot"
            slot.ticket, slot.todo, slot.y = ticket, prompt[n_keep:], None
            slot.saved = slot.saved and n_keep == self.engine.n_past(slot.seq)
            slot.n_prompt = len(prompt)
            slot.checkpoint_at = checkpoint_positions(prompt, self.engine.turn_markers, self.cache.min_step) \
                if self.engine.recurrent and self.cache.n_checkpoints > 0 else []
            slot.out = Output(self.engine, ticket.req, ticket.result)
            slot.acc = self.controller.new_slot() if self.controller else None
            slot.ngram = self.ngram.start(prompt) if self.ngram else None
            ticket.result.stats.by_origin = dict.fromkeys(self.origins, (0, 0))
            slot.max_tokens = min(ticket.req.max_tokens, self.engine.n_ctx - len(prompt))
            slot.t_admit = t_admit
            ticket.result.n_cached, ticket.result.slot = n_keep, slot.seq
            ticket.result.cache_source = source or ""
            ticket.result.t_queue_ms = (slot.t_admit - ticket.t_submit) * 1000
            ticket.sampler.observe_prompt(ticket.req.text_tokens)
            self.metrics.cached_tokens += n_keep
            if source:
                self.metrics.cache_hits[source] += 1
            else:
                self.metrics.cache_misses += 1
            if self.cache.idle_slots:
                for other in self.slots:
                    if other.ticket is None:
                        self._stash(other)
            if not slot.todo:  # the slot holds this very prompt: its first token comes from the kept logits
                try:
                    self._first_token(slot, self.engine.end_logits(slot.seq))
                except InvalidRequestError as exc:
                    self._end(slot, error=exc)

    def _pick_slot(self, free: list[Slot], prompt: list[int]) -> Slot:
        """The free slot sharing the longest prefix with the prompt (ties, and no match at all: the least recently
        used). Any shared prefix is worth keeping: what the new prompt discards of a slot goes to the RAM cache."""
        return max(free, key=lambda s: (common_prefix(self.engine.seqs[s.seq].tokens, prompt), -s.last_used))

    def _restore_from_cache(self, slot: Slot, prompt: list[int]) -> str | None:
        """Restore into `slot` the cached state (RAM, then disk) that shares more of `prompt` than the slot does;
        the name of the source, or None when the slot's own contents are the best start."""
        engine = self.engine
        n_slot = common_prefix(engine.seqs[slot.seq].tokens, prompt)
        floor = max(n_slot + _MIN_RESTORE_GAIN, int(self.cache.similarity * len(prompt)))
        candidates: list[tuple[int, str, object]] = []
        if self.ram is not None:
            entry, n = self.ram.best(prompt)
            if entry is not None and n > floor:
                candidates.append((n, "ram", entry))
        if self.disk is not None and len(prompt) >= self.cache.disk_min_tokens:
            path, n = self.disk.best(prompt)
            if path is not None and n > floor:
                candidates.append((n, "disk", path))
        for n, source, what in sorted(candidates, key=lambda c: -c[0]):
            state = what if isinstance(what, SavedState) else self.disk.load(what)
            if state is None:
                continue
            self._stash(slot)
            if engine.load_state(slot.seq, state):
                slot.saved = source == "ram"
                if self.ram is not None and source == "ram":
                    self.ram.touch(state)
                log.info("%s: slot %d: restored %d cached tokens from the %s cache (%d shared with the prompt)",
                         self.name, slot.seq, len(state.tokens), source, n)
                return source
            log.warning("%s: slot %d: llama.cpp could not restore a %s-cached state of %d tokens", self.name,
                        slot.seq, source, len(state.tokens))
        return None

    def _stash(self, slot: Slot) -> None:
        """Save what the (idle) slot holds to the RAM cache (long prompts reach the disk cache when their prefill
        ends and when the model is unloaded, not on every turn)."""
        if slot.saved or self.ram is None or self.engine.n_past(slot.seq) < 8:
            return
        state = self.engine.save_state(slot.seq)
        slot.saved = True
        if state is None:
            return
        if self.ram is not None:
            self.ram.add(state)

    def _until_checkpoint(self, s: Slot) -> int:
        """How many prompt tokens the slot may prefill before its next checkpoint position (all of them when
        checkpoints are off or the model needs none)."""
        at = self.engine.n_past(s.seq)
        return next((p - at for p in s.checkpoint_at if p > at), len(s.todo))

    def _maybe_checkpoint(self, s: Slot) -> None:
        """Checkpoint the slot's recurrent state when its prefill has reached one of its checkpoint positions."""
        if self.engine.n_past(s.seq) in s.checkpoint_at:
            self.engine.checkpoint(s.seq, self.cache.n_checkpoints)

    def _drafts(self, decoding: list[Slot]) -> tuple[dict[int, Draft], int]:
        """Drafts per decoding slot (seq -> Draft), each capped by its request: an n-gram match where the slot's
        tokens have one (as long as it goes), else model drafts, one k for all the slots the model drafts for; and
        that k (0 when the model did not draft)."""
        out = {s.seq: Draft() for s in decoding}
        k = 0
        if self.ngram is not None:
            for s in decoding:
                s.ngram.sync(s.ticket.result.token_ids)
                d = s.ngram.draft(self._draft_cap(s, self.ngram.n_max))
                if d:
                    out[s.seq] = Draft(d, "ngram", len(d))
        mtp = [s for s in decoding if not out[s.seq].tokens]
        if self.controller is not None and mtp:
            caps = [self._draft_cap(s, self.spec.n_max) for s in mtp]
            k = self.controller.choose([s.acc for s in mtp], max(caps))
            if k > 0:
                drafter = self.draft_model or self.engine
                got = drafter.draft([(s.seq, s.y, min(k, cap)) for s, cap in zip(mtp, caps)], self.spec.p_min)
                for s, d in zip(mtp, got):
                    if d and len(d) >= self.spec.n_min:
                        out[s.seq] = Draft(d, self.model_origin, len(d))
        if self.engine.recurrent and len(decoding) > 1:
            self._pad(decoding, out)
        return out, k

    def _pad(self, decoding: list[Slot], out: dict[int, Draft]) -> None:
        """Pad every verify row to the step's longest, within each slot's cap. A recurrent model takes a batch in
        ubatches with equal tokens per sequence, so rows of unequal length cost extra passes over the weights;
        a filler is verified like any draft (one the target happens to pick is kept), so output stays exact."""
        longest = max(len(d.tokens) for d in out.values())
        for s in decoding:
            d = out[s.seq]
            want = min(longest, self._draft_cap(s, self.engine.config.n_draft_max))
            d.tokens += [d.tokens[-1] if d.tokens else s.y] * (want - len(d.tokens))

    def _draft_cap(self, s: Slot, limit: int) -> int:
        """Drafts this slot may verify: `limit`, its request's NDraft, and never more than it can still emit."""
        n_draft = s.ticket.req.n_draft
        cap = limit if n_draft is None else min(n_draft, limit)
        return max(0, min(cap, s.max_tokens - s.ticket.result.n_tokens - 1))

    def _first_token(self, s: Slot, logits: np.ndarray) -> None:
        """Sample the first token from the prompt's last logits row and emit it."""
        s.t_first = time.perf_counter()
        s.ticket.result.t_prompt_ms = (s.t_first - s.t_admit) * 1000
        if self.disk is not None and s.n_prompt >= self.cache.disk_min_tokens:
            # A long prompt most of which the disk does not hold yet (an agent's system prompt and tools): keep
            # it across restarts. The state is copied now; the file is written in the background.
            _, n_disk = self.disk.best(self.engine.seqs[s.seq].tokens)
            if n_disk < 0.9 * s.n_prompt:
                state = self.engine.save_state(s.seq)
                if state is not None:
                    self.disk.store(state)
        tok = s.ticket.sampler.sample_row(logits)
        if tok is None:  # a grammar that is complete from the start
            return self._end(s, reason="stop")
        extra = s.ticket.inspect(self.engine, logits, tok) if s.ticket.inspect else None
        if self._emit(s, [(tok, extra)]):
            s.y = tok

    def _verify(self, s: Slot, row: Row, draft: Draft, before: Checkpoint | None = None) -> None:
        """Sample each row of a verify batch with the slot's sampler, keep drafts while they match, roll back."""
        engine, ticket, drafts = self.engine, s.ticket, draft.tokens
        accepted: list[tuple[int, dict | None]] = []
        complete = False  # the grammar matched completely and its end token is banned: the output is done
        for i in range(len(row.tokens)):
            tok = ticket.sampler.sample(engine.ctx, row.first + i)
            if tok is None:
                complete = True
                break
            accepted.append((tok, ticket.inspect(engine, engine.logits(row.first + i), tok) if ticket.inspect else None))
            if i == len(drafts) or tok != drafts[i] or engine.is_eog(tok):
                break
        # Row tokens to keep: y and the drafts confirmed; the last sample (if any) is the next y, not yet decoded.
        n_keep = len(accepted) + 1 if complete else len(accepted)
        if kept := engine.rollback_verify(s.seq, len(row.tokens), n_keep, before):
            self._redo.append(Row(s.seq, kept, "none"))
        n, kept = draft.n_real, min(n_keep - 1, draft.n_real)  # fillers count as neither
        ticket.result.stats.observe(n, kept, draft.origin)
        if draft.origin == self.model_origin:
            s.acc.observe(n, kept)
            self.controller.observe_acceptance(n, kept)
        elif draft.origin == "ngram":
            s.ngram.observe(n, kept)
        if not self._emit(s, accepted):
            return
        if complete:
            return self._end(s, reason="stop")
        s.y = accepted[-1][0]

    def _emit(self, s: Slot, tokens: list[tuple[int, dict | None]]) -> bool:
        """Hand a step's tokens to the request as one chunk (a verify step accepts several: one message per step
        down the gRPC and SSE streams, not one per token); False when the slot finished with them."""
        out, result = s.out, s.ticket.result
        merged = Chunk()
        done = False
        for tok, extra in tokens:
            chunk = out.token(tok, extra)
            merged.content += chunk.content
            merged.reasoning += chunk.reasoning
            merged.logprobs += chunk.logprobs
            if out.done or result.n_tokens >= s.max_tokens:
                done = True
                break
        if merged:
            s.ticket.sink(merged)
        result.t_gen_ms = (time.perf_counter() - s.t_first) * 1000
        if done:
            self._end(s)
        return not done

    def _end(self, s: Slot, *, reason: str | None = None, error: BaseException | None = None) -> None:
        """Finish the slot's request (normally, cancelled, or with an error) and free the slot."""
        ticket, s.ticket = s.ticket, None
        s.y, s.todo, s.last_used, s.saved, s.ngram = None, [], time.perf_counter(), False, None
        ticket.sampler.close()
        result = ticket.result
        if error is not None:
            ticket.sink(error)
            return
        if reason != "cancelled" and s.out is not None:  # a cancelled client wants nothing more
            tail = s.out.finish()
            if tail:
                ticket.sink(tail)
        if reason is not None:
            result.finish_reason = reason
        m = self.metrics
        m.requests += 1
        m.prompt_tokens += result.n_prompt
        m.generated_tokens += result.n_tokens
        m.drafted += result.stats.drafted
        m.accepted += result.stats.accepted
        m.last = result
        log.info("%s: slot %d: %d prompt (%d cached%s) + %d generated tokens, %.1f tok/s, finish=%s%s", self.name,
                 s.seq, result.n_prompt, result.n_cached, f" from {result.cache_source}" if result.cache_source else "",
                 result.n_tokens, result.tokens_per_second,
                 result.finish_reason, f", speculation {result.stats.as_dict()}" if result.stats.verify_steps else "")
        ticket.sink(result)


# ------------------------------------------------------------------------------------- consumers


class Stream:
    """A sink that a thread iterates: chunks as they come, then `result`; closing it early cancels the request."""

    _END = object()

    def __init__(self) -> None:
        import queue

        self._q: queue.SimpleQueue = queue.SimpleQueue()
        self.result: Result | None = None
        self.ticket: Ticket | None = None
        self.scheduler: Scheduler | None = None

    def __call__(self, event: Event) -> None:
        self._q.put(event)

    def attach(self, scheduler: Scheduler, req: GenerationRequest) -> "Stream":
        self.scheduler, self.ticket = scheduler, scheduler.submit(req, self)
        return self

    def chunks(self, timeout: float | None = None) -> Iterator[Chunk]:
        """Yield chunks until the request ends; raises its error. Stopping early cancels it."""
        finished = False
        try:
            while True:
                event = self._q.get(timeout=timeout)
                if isinstance(event, Result):
                    self.result, finished = event, True
                    return
                if isinstance(event, BaseException):
                    finished = True
                    raise event
                yield event
        finally:
            if not finished and self.scheduler is not None and self.ticket is not None:
                self.scheduler.cancel(self.ticket)


def collect(scheduler: Scheduler, req: GenerationRequest) -> Result:
    """Run one request to the end and return its `Result`; drives the loop itself when no thread runs it."""
    stream = Stream().attach(scheduler, req)
    if not scheduler._running:
        scheduler.run_until_idle()
    for _ in stream.chunks():
        pass
    assert stream.result is not None
    return stream.result
