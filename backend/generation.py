"""Requests in, text chunks out: the layer between the token loop and any front end (gRPC, benchmarks).

`Model` bundles a loaded `Engine` with its chat template, draft controller and lock; `Model.stream(request)`
yields `Chunk`s whose text never splits a character or leaks a stop string, and leaves a `Result` with
token counts, timings and speculation statistics.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Iterator

import numpy as np

from .chat import ChatTemplate, ReasoningSplitter
from .engine import Engine
from .errors import ContextOverflowError, InvalidRequestError
from .sampling import Sampler, SamplingParams
from .speculative import DraftController, SpecConfig, SpecStats, generate_tokens
from .textstream import TextStream

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GenerationRequest:
    """One completion. `logprobs`: None = off, 0 = the chosen token's only, n = plus the top n."""

    prompt: list[int]
    sampling: SamplingParams = SamplingParams()
    max_tokens: int = 256
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    n_draft: int | None = None
    logprobs: int | None = None
    thinking: bool = False  # the prompt leaves the model inside a <think> block


@dataclass
class Chunk:
    """Newly visible output: content and reasoning text, and logprobs of the tokens it covers."""

    content: str = ""
    reasoning: str = ""
    logprobs: list[dict] = field(default_factory=list)


@dataclass
class Result:
    """Totals of a finished (or stopped) generation."""

    n_prompt: int = 0
    n_tokens: int = 0
    content: str = ""
    reasoning: str = ""
    finish_reason: str = "length"
    t_prompt_ms: float = 0.0
    t_gen_ms: float = 0.0
    stats: SpecStats = field(default_factory=SpecStats)

    @property
    def tokens_per_second(self) -> float:
        return 1000.0 * max(self.n_tokens - 1, 0) / self.t_gen_ms if self.t_gen_ms > 0 else 0.0


class Model:
    """A loaded model ready to serve: engine + template + speculation policy, one request at a time."""

    def __init__(self, engine: Engine, *, name: str, spec: SpecConfig, template: ChatTemplate | None,
                 default_seed: int | None = None) -> None:
        self.engine = engine
        self.default_seed = default_seed  # ModelOptions.Seed: used by requests that set none
        self.name = name
        self.spec = spec
        self.template = template
        self.controller = (
            DraftController(spec.n_max, adaptive=spec.adaptive) if engine.mtp_enabled and spec.n_max > 0 else None
        )
        self.lock = threading.Lock()
        self.last: Result | None = None

    @cached_property
    def eog_tokens(self) -> tuple[int, ...]:
        return tuple(t for t in range(self.engine.n_vocab) if self.engine.is_eog(t))

    def stream(self, req: GenerationRequest, result: Result) -> Iterator[Chunk]:
        """Generate under the model lock, filling `result` as it goes. Stop iterating to cancel."""
        if req.max_tokens <= 0:
            raise InvalidRequestError(f"max tokens must be positive, got {req.max_tokens}")
        if len(req.prompt) >= self.engine.n_ctx:
            raise ContextOverflowError(len(req.prompt), self.engine.n_ctx)
        max_tokens = min(req.max_tokens, self.engine.n_ctx - len(req.prompt))
        sampling = req.sampling
        if sampling.seed is None and self.default_seed is not None:
            sampling = replace(sampling, seed=self.default_seed)
        if req.ignore_eos:
            bias = dict(sampling.logit_bias)
            bias.update({t: -math.inf for t in self.eog_tokens})
            sampling = replace(sampling, logit_bias=bias)
        result.n_prompt = len(req.prompt)
        inspect = _make_logprobs(req.logprobs) if req.logprobs is not None else None
        with self.lock, Sampler(sampling, self.engine.vocab, self.engine.n_vocab) as sampler:
            try:
                yield from self._run(req, max_tokens, sampler, inspect, result)
            finally:
                self.last = result
                log.info("%s: %d prompt + %d generated tokens, %.1f tok/s, finish=%s%s", self.name, result.n_prompt,
                         result.n_tokens, result.tokens_per_second, result.finish_reason,
                         f", speculation {result.stats.as_dict()}" if result.stats.verify_steps else "")

    def _run(self, req, max_tokens, sampler, inspect, result: Result) -> Iterator[Chunk]:
        text = TextStream(req.stop)
        split = ReasoningSplitter(req.thinking)
        t_start = time.perf_counter()
        t_first = None
        tokens = generate_tokens(
            self.engine, sampler, req.prompt, max_tokens=max_tokens, controller=self.controller,
            n_draft_max=req.n_draft, spec=self.spec, stats=result.stats, inspect=inspect,
        )
        try:
            for ev in tokens:
                now = time.perf_counter()
                if t_first is None:
                    t_first = now
                    result.t_prompt_ms = (now - t_start) * 1000
                result.t_gen_ms = (now - t_first) * 1000
                result.n_tokens += 1
                eog = self.engine.is_eog(ev.token)
                piece = b"" if eog else self.engine.piece(ev.token)
                chunk = self._chunk(split, text.feed(piece), ev.extra, result)
                if eog:
                    result.finish_reason = "stop"
                elif text.stopped is not None:
                    result.finish_reason = "stop"
                yield chunk
                if eog or text.stopped is not None:
                    break
        finally:
            tokens.close()
        tail = self._chunk(split, text.flush(), None, result)
        content, reasoning = split.flush()
        tail.content += content
        tail.reasoning += reasoning
        result.content += content
        result.reasoning += reasoning
        if tail.content or tail.reasoning:
            yield tail

    @staticmethod
    def _chunk(split: ReasoningSplitter, text: str, extra: object, result: Result) -> Chunk:
        content, reasoning = split.feed(text) if text else ("", "")
        result.content += content
        result.reasoning += reasoning
        return Chunk(content=content, reasoning=reasoning, logprobs=[extra] if extra is not None else [])


def collect(model: Model, req: GenerationRequest) -> Result:
    """Run a request to the end and return its `Result` (content, reasoning, counts, timings)."""
    result = Result()
    for _ in model.stream(req, result):
        pass
    return result


def _make_logprobs(top_n: int):
    """An `inspect` hook giving OpenAI-format logprobs of each emitted token (from the target's raw logits)."""

    def entry(engine: Engine, tok: int, lp: float) -> dict:
        raw = engine.piece(tok, special=True)
        return {"token": raw.decode("utf-8", "replace"), "logprob": lp, "bytes": list(raw)}

    def inspect(engine: Engine, idx: int, tok: int) -> dict:
        logits = engine.logits(idx).astype(np.float64)
        m = logits.max()
        logz = m + math.log(np.exp(logits - m).sum())
        item = entry(engine, tok, float(logits[tok] - logz))
        if top_n > 0:
            top = np.argpartition(logits, -top_n)[-top_n:]
            top = top[np.argsort(-logits[top])]
            item["top_logprobs"] = [entry(engine, int(t), float(logits[t] - logz)) for t in top]
        else:
            item["top_logprobs"] = []
        return item

    return inspect
