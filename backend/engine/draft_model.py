"""llama.cpp's draft-simple: a second, smaller GGUF of the target's vocabulary drafts for every slot.

The draft model keeps one sequence per target slot. Before each step it is brought in line with what its slot
holds plus the token sampled but not yet decoded (`y`): the common prefix stays in its KV, the rest is decoded
again, every slot in one batch. Then it drafts greedily, one batched decode per draft position, and the target
verifies the drafts in the scheduler's verify batch like MTP's, so output is the target's own whatever the draft
model says. The draft model must be able to cut its memory anywhere: a model with recurrent layers is refused.
"""

from __future__ import annotations

import ctypes
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import llama_cpp.llama_cpp as L

from ..core.errors import InvalidOptionError
from .llama import DecodeError, Engine, Row
from .speculative import greedy_pick

log = logging.getLogger(__name__)

# llama.cpp's bound on the vocabulary sizes of a draft and its target (common/speculative.cpp)
VOCAB_MAX_SIZE_DIFFERENCE = 128
_FIRST_COMPARED_TOKEN = 5  # llama.cpp compares token texts from id 5 on (the first ids are often special)
# What a drafting step's sync decodes once the draft model keeps pace: the last draft (never decoded) and y.
_STEADY_ROW = 2


def _text(engine: Engine, token: int) -> bytes:
    return ctypes.string_at(L.llama_vocab_get_text(engine.vocab, token) or b"")


def check_compatible(target: Engine, draft: Engine) -> None:
    """Refuse a draft model whose tokens do not mean the target's, as llama.cpp's
    `common_speculative_are_compatible` judges it: vocabulary type, BOS/EOS use and ids, sizes within 128, and
    the same text for every token both have. Also refuse one with recurrent layers (its drafts cannot be cut
    back)."""
    name = Path(draft.path).name
    if draft.recurrent:
        raise InvalidOptionError(f"DraftModel {name} has recurrent layers, which cannot roll back a rejected draft: "
                                 "use a transformer draft model, or spec_type draft-mtp for an MTP GGUF")
    tv, dv = target.vocab, draft.vocab
    if L.llama_vocab_type(tv) != L.llama_vocab_type(dv):
        raise InvalidOptionError(f"DraftModel {name} has another kind of vocabulary than the model "
                                 f"(type {L.llama_vocab_type(dv)} vs {L.llama_vocab_type(tv)})")
    for what, add, tok in (("BOS", L.llama_vocab_get_add_bos, L.llama_vocab_bos),
                           ("EOS", L.llama_vocab_get_add_eos, L.llama_vocab_eos)):
        if add(tv) != add(dv) or (add(tv) and tok(tv) != tok(dv)):
            raise InvalidOptionError(f"DraftModel {name} uses its {what} token differently from the model "
                                     f"(added: {bool(add(dv))} vs {bool(add(tv))}, id {tok(dv)} vs {tok(tv)})")
    if abs(target.n_vocab - draft.n_vocab) > VOCAB_MAX_SIZE_DIFFERENCE:
        raise InvalidOptionError(f"DraftModel {name} has {draft.n_vocab} tokens and the model {target.n_vocab}: "
                                 f"more than {VOCAB_MAX_SIZE_DIFFERENCE} apart, so it is not the same vocabulary")
    for token in range(_FIRST_COMPARED_TOKEN, min(target.n_vocab, draft.n_vocab)):
        if _text(target, token) != _text(draft, token):
            raise InvalidOptionError(f"DraftModel {name} is not of the model's vocabulary: token {token} is "
                                     f"{_text(draft, token)!r} there and {_text(target, token)!r} here")


@dataclass
class _Slot:
    """One sequence while `DraftModel.draft` runs: how many drafts it may take and those it has."""

    seq: int
    limit: int
    row: Row
    out: list[int] = field(default_factory=list)


class DraftModel:
    """A draft model serving the target's slots: `draft` has `Engine.draft`'s signature, so the scheduler drafts
    with it where it would with the MTP head (and its draft-length controller times it the same way)."""

    def __init__(self, engine: Engine, target: Engine) -> None:
        check_compatible(target, engine)
        self.engine = engine
        self.target = target
        self.catchup_seconds = 0.0  # decoding to catch up with the target (a new prompt, undrafted steps)

    def draft(self, starts: list[tuple[int, int, int]], p_min: float = 0.0) -> list[list[int]]:
        """Greedy drafts for several target sequences at once: `starts` holds (seq, y, n) as for the MTP head.
        A sequence stops at `n`, at a draft whose top-10 probability is below `p_min`, at an end-of-generation
        token, or at a token the target lacks. A prompt with images gets no drafts (the draft model sees no
        pixels)."""
        try:
            slots = [s for s in (self._sync(seq, y, n) for seq, y, n in starts if n > 0) if s is not None]
            live = [s for group in self._groups(slots) for s in self._decode_and_pick(group, p_min)]
            while live:
                live = self._decode_and_pick(live, p_min)
        except DecodeError as exc:  # the draft sequences start over next step; the target decodes on without drafts
            log.warning("%s: draft model decode failed, no drafts this step: %s", self.engine.path, exc)
            return [[] for _ in starts]
        by_seq = {s.seq: s.out for s in slots}
        return [by_seq.get(seq, []) for seq, _, _ in starts]

    def _sync(self, seq: int, y: int, n: int) -> _Slot | None:
        """Make the draft sequence hold what the target's does (its prefix reused), and return the row still
        to decode: the rest, ending with `y`, whose logits give the first draft."""
        context = [*self.target.seqs[seq].tokens, y]
        n = min(n, self.engine.n_ctx - len(context) - 1)
        if n <= 0 or min(context) < 0:
            return None
        todo = self._catch_up(seq, context, _STEADY_ROW)
        return _Slot(seq, n, Row(seq, todo, "last"))

    def follow(self, seq: int) -> None:
        """Decode into the draft sequence what the target's holds (a prompt chunk it just prefilled), so drafting
        starts in step: the draft model's prompt is processed with the target's, as prompt time."""
        tokens = self.target.seqs[seq].tokens
        if tokens and min(tokens) >= 0:
            try:
                self._catch_up(seq, tokens, 0)
            except DecodeError as exc:  # drafting catches up later
                log.warning("%s: draft model prefill failed: %s", self.engine.path, exc)

    def _catch_up(self, seq: int, context: list[int], leave: int) -> list[int]:
        """Make the draft sequence hold `context` but its last `leave` tokens (its shared prefix kept), and return
        those. A catch-up longer than the steady state's row (a new prompt, steps decoded without drafts) is timed
        apart, so the draft-length controller judges drafting by what a step costs once the draft keeps pace."""
        todo = context[self.engine.keep_prefix(seq, context):]
        if len(todo) > max(leave, _STEADY_ROW):
            t0, eng = time.perf_counter(), self.engine
            for start in range(0, len(todo) - leave, eng.n_batch):
                eng.decode_tokens(todo[start:min(start + eng.n_batch, len(todo) - leave)], seq=seq, logits="none")
            del todo[:len(todo) - leave]
            self.catchup_seconds += time.perf_counter() - t0
        return todo

    def _groups(self, slots: list[_Slot]) -> list[list[_Slot]]:
        """The slots' rows in as few decodes of at most `n_batch` tokens as they fit."""
        groups: list[list[_Slot]] = [[]]
        size = 0
        for s in sorted(slots, key=lambda s: len(s.row.tokens)):
            if size + len(s.row.tokens) > self.engine.n_batch:
                groups.append([])
                size = 0
            groups[-1].append(s)
            size += len(s.row.tokens)
        return [g for g in groups if g]

    def _decode_and_pick(self, slots: list[_Slot], p_min: float) -> list[_Slot]:
        """Decode the slots' rows in one batch, take each one's next draft, and return those drafting on (their
        next row is that draft)."""
        if not slots:
            return []
        self.engine.decode([s.row for s in slots])
        going = []
        for s in slots:
            tok, sure = greedy_pick(self.engine.logits(s.row.last), p_min)
            if not sure or tok >= self.target.n_vocab:
                continue
            s.out.append(tok)
            if len(s.out) < s.limit and not self.target.is_eog(tok):
                s.row = Row(s.seq, [tok], "last")
                going.append(s)
        return going

    def set_threads(self, n: int) -> None:
        self.engine.set_threads(n)

    def close(self) -> None:
        self.engine.close()
