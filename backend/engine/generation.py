"""What a request asks for and what it gets back: `GenerationRequest` in, `Chunk`s and a `Result` out.

`Output` turns one request's emitted tokens into chunks whose text never splits a character or leaks a stop
string, with reasoning split out and OpenAI logprobs attached; the scheduler runs it for every slot as tokens
are accepted, so a stop string ends that slot at once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from .llama import Engine
from .sampling import SamplingParams
from .speculative import SpecStats
from .textstream import ReasoningSplitter, TextStream
from .vision import Image


@dataclass(frozen=True)
class GenerationRequest:
    """One completion. `logprobs`: None = off, 0 = the chosen token's only, n = plus the top n.

    `prompt` holds one entry per position: text tokens, and at each image's positions its (negative) key, once
    per position it occupies; `images` are those images, encoded (`Projector.prompt` makes both).
    """

    prompt: list[int]
    sampling: SamplingParams = SamplingParams()
    max_tokens: int = 256
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    n_draft: int | None = None
    logprobs: int | None = None
    thinking: bool = False  # the prompt leaves the model inside a <think> block
    images: tuple[Image, ...] = ()

    @property
    def n_prompt(self) -> int:
        """Prompt tokens as clients count them: text tokens plus every image's embedding rows."""
        return len(self.prompt) + sum(img.n_tokens - img.n_pos for img in self.images)

    @property
    def text_tokens(self) -> list[int]:
        return [t for t in self.prompt if t >= 0] if self.images else self.prompt


@dataclass
class Chunk:
    """Newly visible output: content and reasoning text, and logprobs of the tokens it covers."""

    content: str = ""
    reasoning: str = ""
    logprobs: list[dict] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.content or self.reasoning or self.logprobs)


@dataclass
class Result:
    """Totals of a finished (or stopped) generation. `finish_reason`: stop, length or cancelled."""

    n_prompt: int = 0
    n_tokens: int = 0
    n_cached: int = 0  # prompt tokens not prefilled: reused from the slot, a checkpoint or the prompt cache
    cache_source: str = ""  # where they came from: slot, checkpoint, ram, disk ("" when none)
    token_ids: list[int] = field(default_factory=list)  # every emitted token, EOS included
    content: str = ""
    reasoning: str = ""
    finish_reason: str = "length"
    t_queue_ms: float = 0.0  # waiting for a slot
    t_prompt_ms: float = 0.0  # prefill up to the first token
    t_gen_ms: float = 0.0  # first token to last
    slot: int = -1
    stats: SpecStats = field(default_factory=SpecStats)

    @property
    def tokens_per_second(self) -> float:
        return 1000.0 * max(self.n_tokens - 1, 0) / self.t_gen_ms if self.t_gen_ms > 0 else 0.0


Inspect = Callable[[Engine, np.ndarray, int], dict]  # (engine, logits row, token) -> OpenAI logprobs entry


class Output:
    """One request's emitted tokens -> chunks, filling its `Result`; `done` once EOS or a stop string ended it."""

    def __init__(self, engine: Engine, req: GenerationRequest, result: Result) -> None:
        self.engine = engine
        self.result = result
        self._text = TextStream(req.stop)
        self._split = ReasoningSplitter(req.thinking)
        self.done = False

    def token(self, token: int, extra: dict | None) -> Chunk:
        """Account for one emitted token and return what became visible."""
        r = self.result
        r.n_tokens += 1
        r.token_ids.append(token)
        if self.engine.is_eog(token):
            r.finish_reason, self.done = "stop", True
            return self._chunk("", extra)
        chunk = self._chunk(self._text.feed(self.engine.piece(token)), extra)
        if self._text.stopped is not None:
            r.finish_reason, self.done = "stop", True
        return chunk

    def finish(self) -> Chunk:
        """The text held back at the end (a partial stop string or tag that never completed)."""
        tail = self._chunk(self._text.flush(), None)
        content, reasoning = self._split.flush()
        tail.content += content
        tail.reasoning += reasoning
        self.result.content += content
        self.result.reasoning += reasoning
        return tail

    def _chunk(self, text: str, extra: dict | None) -> Chunk:
        content, reasoning = self._split.feed(text) if text else ("", "")
        self.result.content += content
        self.result.reasoning += reasoning
        return Chunk(content=content, reasoning=reasoning, logprobs=[extra] if extra is not None else [])


def make_logprobs(top_n: int) -> Inspect:
    """An inspect hook giving OpenAI-format logprobs of each emitted token (from the target's raw logits)."""

    def entry(engine: Engine, tok: int, lp: float) -> dict:
        raw = engine.piece(tok, special=True)
        return {"token": raw.decode("utf-8", "replace"), "logprob": lp, "bytes": list(raw)}

    def inspect(engine: Engine, row: np.ndarray, tok: int) -> dict:
        logits = row.astype(np.float64)
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
