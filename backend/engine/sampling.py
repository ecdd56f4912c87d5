"""Samplers: a request's sampling settings as a frozen value, and the llama.cpp sampler chain built from it.

Sampling runs inside llama.cpp (`llama_sampler_sample` on a context's logits row), so plain decoding and MTP
verification draw from the very same chain and RNG: with a seed, speculative output equals plain output.

Zero means "off" for every field, as in llama.cpp and LocalAI's proto3 wire format (a zero is never sent):
temperature 0 = greedy, top_k 0 = no top-k, top_p 0 or 1 = no top-p, min_p 0 = no min-p, penalty 0 or 1 =
no repeat penalty, repeat 0 = penalty window of 64 tokens (llama.cpp's default).
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import re
import sys
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import llama_cpp.llama_cpp as L
import numpy as np

from ..core.errors import InvalidRequestError
from .llamalog import ERROR, LIVE, LLAMA_LOG

DEFAULT_REPEAT_LAST_N = 64
DEFAULT_SEED = 0xFFFFFFFF  # LLAMA_DEFAULT_SEED: a random seed per request


@dataclass(frozen=True)
class SamplingParams:
    """How one request picks tokens. Validated on construction (`InvalidRequestError` names the field)."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 0.0
    min_p: float = 0.0
    repeat_penalty: float = 0.0
    repeat_last_n: int = 0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    seed: int | None = None
    grammar: str = ""
    # A lazy grammar waits until the output matches one of these ECMAScript regexes (from their first match on);
    # they must come from `grammars.trigger_patterns`: llama.cpp aborts on a regex it cannot compile.
    grammar_triggers: tuple[str, ...] = ()
    logit_bias: dict[int, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        checks = [
            ("temperature", self.temperature, math.isfinite(self.temperature) and self.temperature >= 0, ">= 0"),
            ("top_k", self.top_k, self.top_k >= 0, ">= 0"),
            ("top_p", self.top_p, 0 <= self.top_p <= 1, "in [0, 1]"),
            ("min_p", self.min_p, 0 <= self.min_p <= 1, "in [0, 1]"),
            ("repeat_penalty", self.repeat_penalty, math.isfinite(self.repeat_penalty) and self.repeat_penalty >= 0, ">= 0"),
            ("repeat_last_n", self.repeat_last_n, self.repeat_last_n >= -1, ">= -1"),
            ("frequency_penalty", self.frequency_penalty, math.isfinite(self.frequency_penalty), "finite"),
            ("presence_penalty", self.presence_penalty, math.isfinite(self.presence_penalty), "finite"),
        ]
        for name, value, ok, want in checks:
            if not ok:
                raise InvalidRequestError(f"invalid {name}={value!r}: must be {want}")
        for tok, bias in self.logit_bias.items():
            if not math.isfinite(bias) and bias != -math.inf:
                raise InvalidRequestError(f"invalid logit_bias for token {tok}: {bias!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0


def parse_logit_bias(text: str, n_vocab: int) -> dict[int, float]:
    """Parse LocalAI's `LogitBias` JSON map (`{"token_id": bias}`); `false`/-100 style bans are kept as given."""
    if not text:
        return {}
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidRequestError(f"LogitBias is not valid JSON: {exc}", param="LogitBias") from None
    if not isinstance(raw, dict):
        raise InvalidRequestError("LogitBias must be a JSON object mapping token ids to biases", param="LogitBias")
    out: dict[int, float] = {}
    for key, value in raw.items():
        try:
            tok = int(key)
        except ValueError:
            raise InvalidRequestError(f"LogitBias key {key!r} is not a token id", param="LogitBias") from None
        try:
            bias = -math.inf if value is False else float(value)
        except (TypeError, ValueError):
            raise InvalidRequestError(f"LogitBias for token {tok}: {value!r} is not a number (or false)",
                                      param="LogitBias") from None
        if not 0 <= tok < n_vocab:
            raise InvalidRequestError(f"LogitBias token id {tok} is outside the vocabulary (0..{n_vocab - 1})",
                                      param="LogitBias")
        out[tok] = bias
    return out


def _grammar_sampler(p: SamplingParams, vocab: int) -> int:
    """The grammar stage (lazy when there are triggers); a grammar llama.cpp cannot parse fails with its reason."""
    with LLAMA_LOG.capture(ERROR) as lines, _stderr() as direct:
        if p.grammar_triggers:
            patterns = (ctypes.c_char_p * len(p.grammar_triggers))(*(t.encode() for t in p.grammar_triggers))
            smpl = L.llama_sampler_init_grammar_lazy_patterns(vocab, p.grammar.encode(), b"root", patterns,
                                                              len(p.grammar_triggers), None, 0)
        else:
            smpl = L.llama_sampler_init_grammar(vocab, p.grammar.encode(), b"root")
    if direct:
        os.write(2, direct[0].encode())  # the parser's own words, or someone else's output caught in passing
    if smpl:
        LIVE["sampler"] += 1
        return smpl
    # The parser's reason goes to stderr ("parse: error parsing grammar: <why>\n\n<grammar>"), the rest to the log.
    reasons = _PARSE_ERROR.findall(direct[0] if direct else "")
    why = "; ".join(reasons + [line.strip() for line in lines if line.strip()]) or "see the log"
    raise InvalidRequestError(f"grammar could not be parsed (GBNF with a root rule expected): {why}", param="Grammar")


_PARSE_ERROR = re.compile(r"error parsing grammar: ([^\n]*)")
_STDERR_LOCK = threading.Lock()


@contextmanager
def _stderr() -> Iterator[list[str]]:
    """What llama.cpp writes straight to file descriptor 2 (not through its log callback) while the block runs."""
    out: list[str] = []
    with _STDERR_LOCK, tempfile.TemporaryFile() as tmp:
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(tmp.fileno(), 2)
        try:
            yield out
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            text = tmp.read().decode("utf-8", "replace")
            if text:
                out.append(text)


class Sampler:
    """A llama.cpp sampler chain for one request. Use as a context manager; `sample` also accepts the token.

    A grammar stays outside the chain and is checked the way llama.cpp's own `common_sampler` does it: the chain
    picks a token, the grammar checks that one token, and only when it refuses is the grammar applied to every
    candidate and the pick made again. Checking the whole vocabulary each step would cost ~10 ms per token at a
    49k vocabulary on a CPU core, and five times that at Qwen's 248k (see bench/bench_grammar.py).
    """

    def __init__(self, params: SamplingParams, vocab: int, n_vocab: int) -> None:
        self.params = params
        self._vocab, self._n_vocab = vocab, n_vocab
        self._penalties: int | None = None
        self._grammar = _grammar_sampler(params, vocab) if params.grammar else None
        self._chain = L.llama_sampler_chain_init(L.llama_sampler_chain_default_params())
        LIVE["sampler"] += 1
        try:
            self._add_filters(params, vocab, n_vocab)
            if params.greedy:
                self._add(L.llama_sampler_init_greedy())
            else:
                self._add(L.llama_sampler_init_temp(params.temperature))
                seed = DEFAULT_SEED if params.seed is None or params.seed < 0 else params.seed & 0xFFFFFFFF
                self._add(L.llama_sampler_init_dist(seed))
        except BaseException:
            self.close()  # a refused stage: free what was built
            raise

    def _add(self, smpl: int) -> int:
        if not smpl:
            raise InvalidRequestError("llama.cpp refused a sampler setting (see the log)")
        L.llama_sampler_chain_add(self._chain, smpl)
        return smpl

    def _add_filters(self, p: SamplingParams, vocab: int, n_vocab: int) -> None:
        if p.logit_bias:
            arr = (L.llama_logit_bias * len(p.logit_bias))()
            for i, (tok, bias) in enumerate(p.logit_bias.items()):
                arr[i].token, arr[i].bias = tok, bias
            self._add(L.llama_sampler_init_logit_bias(n_vocab, len(p.logit_bias), arr))
        penalty = p.repeat_penalty if p.repeat_penalty > 0 else 1.0
        if penalty != 1.0 or p.frequency_penalty or p.presence_penalty:
            last_n = p.repeat_last_n or DEFAULT_REPEAT_LAST_N
            self._penalties = self._add(
                L.llama_sampler_init_penalties(n_vocab, last_n, penalty, p.frequency_penalty, p.presence_penalty)
            )
        if p.greedy:
            return  # truncation filters cannot change an argmax
        if p.top_k > 0:
            self._add(L.llama_sampler_init_top_k(p.top_k))
        if 0 < p.top_p < 1:
            self._add(L.llama_sampler_init_top_p(p.top_p, 1))
        if p.min_p > 0:
            self._add(L.llama_sampler_init_min_p(p.min_p, 1))

    def observe_prompt(self, tokens: list[int]) -> None:
        """Let the repetition penalties see the prompt (the grammar must not: it constrains output only)."""
        if self._penalties is not None:
            for tok in tokens:
                L.llama_sampler_accept(self._penalties, tok)

    def sample(self, ctx: int, idx: int) -> int | None:
        """Pick a token from output row `idx` of `ctx`'s last decode and accept it into the chain (see
        `sample_row`)."""
        if self._grammar is None:
            return int(L.llama_sampler_sample(self._chain, ctx, idx))
        return self.sample_row(np.ctypeslib.as_array(L.llama_get_logits_ith(ctx, idx), shape=(self._n_vocab,)))

    def sample_row(self, logits: np.ndarray) -> int | None:
        """Pick a token from one row of logits and accept it into the chain (a row kept from an earlier decode
        gives the token that decode would have given).

        With a grammar, the chain's choice is checked against the grammar and the grammar masks the vocabulary only
        when it refuses that choice (llama.cpp's own order). Every state that leaves no candidate is handled here,
        because llama.cpp throws through its C API (killing the process) when made to accept a refused token:
        None means the grammar has matched completely and the end-of-generation token it allows is banned
        (IgnoreEOS), so the output is finished; a grammar whose every allowed token is banned is a request error.
        """
        token = self._pick(logits, grammar=False)
        if self._grammar is not None and (token is None or not self._allowed(token)):
            token = self._pick(logits, grammar=True)
            if token is None and any(self._allowed(t) for t in self._eog()):
                return None
        if token is None:
            raise InvalidRequestError("no token is possible here: logit_bias bans every token"
                                      + (" the grammar allows" if self._grammar is not None else ""))
        if self._grammar is not None:
            L.llama_sampler_accept(self._grammar, token)
        L.llama_sampler_accept(self._chain, token)
        return token

    def _eog(self) -> list[int]:
        return [t for t in (L.llama_vocab_eos(self._vocab), L.llama_vocab_eot(self._vocab)) if t >= 0]

    def _pick(self, logits: np.ndarray, *, grammar: bool) -> int | None:
        """The chain's choice over all candidates (after the grammar's mask if `grammar`), not accepted yet; None
        when every candidate is banned."""
        if not hasattr(self, "_data"):
            self._data = (L.llama_token_data * self._n_vocab)()
            self._view = np.ctypeslib.as_array(self._data)
            self._ids = np.arange(self._n_vocab, dtype=np.int32)
        self._view["id"], self._view["logit"], self._view["p"] = self._ids, logits, 0.0
        cur = L.llama_token_data_array(self._data, self._n_vocab, -1, False)
        if grammar:
            L.llama_sampler_apply(self._grammar, ctypes.byref(cur))
        L.llama_sampler_apply(self._chain, ctypes.byref(cur))
        if not 0 <= cur.selected < cur.size or math.isinf(cur.data[cur.selected].logit):
            return None
        return int(cur.data[cur.selected].id)

    def _allowed(self, token: int) -> bool:
        one = (L.llama_token_data * 1)()
        one[0].id, one[0].logit, one[0].p = token, 0.0, 0.0
        L.llama_sampler_apply(self._grammar, ctypes.byref(L.llama_token_data_array(one, 1, -1, False)))
        return not math.isinf(one[0].logit)

    def close(self) -> None:
        if self._chain:
            L.llama_sampler_free(self._chain)
            self._chain = None
            LIVE["sampler"] -= 1
        if self._grammar:
            L.llama_sampler_free(self._grammar)
            self._grammar = None
            LIVE["sampler"] -= 1

    def __enter__(self) -> "Sampler":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
