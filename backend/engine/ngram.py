"""Prompt-lookup drafting: draft tokens from the request's own text, as llama.cpp's `ngram-simple` and `ngram-mod`.

Both look at the last n tokens of a request's history (its prompt and what it generated so far, ending with the
token sampled but not yet decoded) and propose what followed them before. No model runs: a draft costs a few
dictionary lookups, so a long draft is cheap, and it pays wherever the output repeats its input (code edits,
quoting, extraction). Drafts go through the same verify row as MTP drafts, so they change speed, never output.

* `ngram-simple` (common/ngram-map.cpp `common_ngram_simple_draft`): the most recent earlier occurrence of the
  last `size_n` tokens; the draft is the up to `size_m` tokens after it, dropped when shorter than `size_n`.
  llama.cpp scans the history backwards each step; here an index from each n-gram to its latest occurrence is
  kept up to date token by token, so a step costs O(n + m) however long the context is.
* `ngram-mod` (common/ngram-mod.cpp, llama.cpp PR 19164): a fixed-size hash table from an `n_match`-gram to the
  token that followed it last, shared by every slot of the model (requests learn from each other). A draft
  chains lookups from the last `n_match` tokens, up to `n_max`; it is dropped when shorter than `n_min`. The
  table is reset when more than a quarter of it is in use at a request's start, and after five drafts in a row
  with under a quarter accepted. llama.cpp adds generated n-grams in chunks of 32; here they are added as the
  tokens come, so a repetition inside the output is drafted from its second occurrence.

Both hash n-grams with common_ngram_mod's polynomial (multiplier 6364136223846793005, mod 2^64), which rolls:
the window's hash moves one token in O(1).
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np

from .speculative import SpecConfig

NGRAM_TYPES = ("ngram-simple", "ngram-mod")
_MUL = 6364136223846793005  # common_ngram_mod::idx
_MASK = (1 << 64) - 1
_TABLE_SIZE = 4 * 1024 * 1024  # common_speculative_impl_ngram_mod: 4M entries (16 MiB)
_TABLE_MAX_USE = 0.25  # reset above this occupancy at a request's start
_LOW_ACCEPT, _LOW_STREAK = 0.25, 5  # five drafts in a row under 25% accepted: the table is stale


def window_hashes(tokens: list[int], n: int) -> np.ndarray:
    """The hash of every window `tokens[i:i+n]`, i = 0..len-n (empty when shorter than n)."""
    m = len(tokens) - n + 1
    if m <= 0:
        return np.zeros(0, np.uint64)
    t = np.asarray(tokens, np.int64).astype(np.uint64)  # a negative id (an image position) wraps like size_t
    h = np.zeros(m, np.uint64)
    for j in range(n):
        h = h * np.uint64(_MUL) + t[j:j + m]  # uint64 arithmetic wraps: the hash is mod 2^64
    return h


def _hash(tokens: list[int]) -> int:
    h = 0
    for t in tokens:
        h = (h * _MUL + t) & _MASK
    return h


class NgramDrafter(ABC):
    """One request's n-gram drafter: its tokens (prompt, then what it generated), the rolling hash of their last n,
    and (in subclasses) an index of the earlier n-grams that `draft` looks the last one up in."""

    def __init__(self, n: int, prompt: list[int]) -> None:
        self.n = n
        self.tokens = list(prompt)
        self.n_prompt = len(prompt)
        self._top = pow(_MUL, n - 1, 1 << 64)  # weight of the window's oldest token
        self.hash = _hash(self.tokens[-n:]) if len(self.tokens) >= n else None

    def sync(self, generated: list[int]) -> None:
        """Take in the tokens generated since the last call (`generated` is all of them so far)."""
        for t in generated[len(self.tokens) - self.n_prompt:]:
            if self.hash is not None:  # the last n-gram now has a follower
                self._record(self.hash, len(self.tokens) - self.n, t)
                self.hash = self._roll(self.hash, self.tokens[-self.n], t)
            self.tokens.append(t)
            if len(self.tokens) == self.n:
                self.hash = _hash(self.tokens)

    def _roll(self, h: int, out: int, new: int) -> int:
        return ((h - out * self._top) * _MUL + new) & _MASK

    @abstractmethod
    def _record(self, h: int, start: int, follower: int) -> None:
        """The n-gram with hash `h` starting at `start` was just followed by `follower`."""

    @abstractmethod
    def draft(self, cap: int) -> list[int]:
        """Up to `cap` tokens predicted to follow the history; [] when there is no usable match."""

    @abstractmethod
    def observe(self, drafted: int, accepted: int) -> None:
        """One verify of this drafter's tokens: `drafted` proposed, `accepted` kept."""


def _clip(draft: list[int], cap: int) -> list[int]:
    """At most `cap` tokens, and none from an image's positions (negative keys are not tokens)."""
    draft = draft[:cap]
    return draft[:next((i for i, t in enumerate(draft) if t < 0), len(draft))]


class NgramSimple(NgramDrafter):
    """`ngram-simple` for one request: an index from each n-gram's hash to its latest start with a follower."""

    def __init__(self, prompt: list[int], size_n: int, size_m: int) -> None:
        super().__init__(size_n, prompt)
        self.m = size_m
        # Windows that have a follower start at 0..len-n-1; a later start overwrites an earlier one.
        self._last: dict[int, int] = dict(zip(window_hashes(self.tokens[:-1], size_n).tolist(), range(len(prompt))))

    def _record(self, h: int, start: int, follower: int) -> None:
        self._last[h] = start

    def draft(self, cap: int) -> list[int]:
        if self.hash is None or cap <= 0:
            return []
        n, end = self.n, len(self.tokens)
        j = self._last.get(self.hash)
        if j is None or self.tokens[j:j + n] != self.tokens[end - n:]:  # no match, or a hash collision
            return []
        draft = self.tokens[j + n:j + n + self.m]
        return _clip(draft, cap) if len(draft) >= n else []

    def observe(self, drafted: int, accepted: int) -> None:
        """Nothing to learn: the index holds the history as it is (llama.cpp's accept is a no-op too)."""


class NgramTable:
    """common_ngram_mod: n-gram hash -> the token that followed it last, in a fixed table shared by a model's slots."""

    EMPTY = -1

    def __init__(self, n: int, size: int = _TABLE_SIZE) -> None:
        self.n = n
        self.entries = np.full(size, self.EMPTY, np.int32)
        self.used = 0

    @property
    def occupancy(self) -> float:
        return self.used / len(self.entries)

    def reset(self) -> None:
        self.entries.fill(self.EMPTY)
        self.used = 0

    def add_history(self, tokens: list[int]) -> None:
        """Every n-gram of `tokens` with the token after it (a whole prompt at once)."""
        hashes = window_hashes(tokens[:-1], self.n)
        followers = np.asarray(tokens[self.n:], np.int64)
        keep = followers >= 0  # an image position follows: nothing to draft
        idx = (hashes[keep] % np.uint64(len(self.entries))).astype(np.int64)
        self.used += len(np.unique(idx[self.entries[idx] == self.EMPTY]))
        self.entries[idx] = followers[keep]  # the later of two equal indices wins, as when added one by one

    def add(self, h: int, follower: int) -> None:
        if follower < 0:
            return
        i = h % len(self.entries)
        if self.entries[i] == self.EMPTY:
            self.used += 1
        self.entries[i] = follower

    def get(self, h: int) -> int:
        return int(self.entries[h % len(self.entries)])


class NgramMod(NgramDrafter):
    """`ngram-mod` for one request, drafting from (and adding its n-grams to) the model's shared table."""

    def __init__(self, table: NgramTable, prompt: list[int], n_min: int, n_max: int) -> None:
        super().__init__(table.n, prompt)
        self.table, self.n_min, self.n_max = table, n_min, n_max
        self._low = 0
        if table.occupancy > _TABLE_MAX_USE:
            table.reset()
        table.add_history(self.tokens)

    def _record(self, h: int, start: int, follower: int) -> None:
        self.table.add(h, follower)

    def draft(self, cap: int) -> list[int]:
        if self.hash is None or cap <= 0:
            return []
        tail, h = self.tokens[-self.n:], self.hash
        out: list[int] = []
        while len(out) < self.n_max:
            tok = self.table.get(h)
            if tok == NgramTable.EMPTY:
                break
            out.append(tok)
            i = len(out) - 1  # the window slides past tail[i] (or, once beyond the tail, past out[i - n])
            h = self._roll(h, tail[i] if i < self.n else out[i - self.n], tok)
        return _clip(out, cap) if len(out) >= max(self.n_min, 1) else []

    def observe(self, drafted: int, accepted: int) -> None:
        if drafted <= 0:
            return
        if accepted / drafted >= _LOW_ACCEPT:
            self._low = 0
            return
        self._low += 1
        if self._low >= _LOW_STREAK:  # the table predicts badly: start it over from this request
            self.table.reset()
            self.table.add_history(self.tokens)
            self._low = 0


class NgramDrafting:
    """A model's n-gram drafting: its settings, the `ngram-mod` table, and one drafter per request."""

    def __init__(self, spec: SpecConfig) -> None:
        if spec.ngram not in NGRAM_TYPES:
            raise ValueError(f"n-gram drafting is one of {NGRAM_TYPES}, not {spec.ngram!r}")
        self.spec = spec
        self.table = NgramTable(spec.ngram_mod_n_match) if spec.ngram == "ngram-mod" else None

    @property
    def n_max(self) -> int:
        """The longest draft this drafting proposes."""
        return self.spec.ngram_max

    def start(self, prompt: list[int]) -> NgramDrafter:
        """A drafter for a request with this prompt."""
        s = self.spec
        if self.table is not None:
            return NgramMod(self.table, prompt, s.ngram_mod_n_min, s.ngram_mod_n_max)
        return NgramSimple(prompt, s.ngram_size_n, s.ngram_size_m)
