"""Token bytes -> text chunks that never split a UTF-8 character or leak part of a stop string; reasoning split."""

from __future__ import annotations

import codecs

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


def held_prefix(text: str, words: tuple[str, ...]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of one of `words`: text to hold back, since
    the next piece may complete the word (a stop string, a tag, a tool-call marker)."""
    best = 0
    for w in words:
        for n in range(min(len(w) - 1, len(text)), best, -1):
            if text.endswith(w[:n]):
                best = n
                break
    return best


class TextStream:
    """Incremental detokenised text with stop-string handling.

    `feed(b)` returns the text that is now safe to show; `stopped` turns True once a stop string appeared
    (the stop string and everything after it are dropped); `flush()` returns what was held back.
    """

    def __init__(self, stops: tuple[str, ...] = ()) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self._stops = tuple(s for s in stops if s)
        self._held = ""
        self.stopped: str | None = None
        self.text = ""  # everything emitted so far

    def feed(self, data: bytes) -> str:
        if self.stopped is not None:
            return ""
        pending = self._held + self._decoder.decode(data)
        cut = self._first_stop(pending)
        if cut is not None:
            pos, stop = cut
            self.stopped = stop
            self._held = ""
            return self._emit(pending[:pos])
        keep = held_prefix(pending, self._stops)
        self._held = pending[len(pending) - keep:] if keep else ""
        return self._emit(pending[: len(pending) - keep])

    def flush(self) -> str:
        """End of generation: whatever was held back (a partial stop string that never completed)."""
        if self.stopped is not None:
            return ""
        rest = self._held + self._decoder.decode(b"", final=True)
        self._held = ""
        return self._emit(rest)

    def _emit(self, text: str) -> str:
        self.text += text
        return text

    def _first_stop(self, text: str) -> tuple[int, str] | None:
        found = [(text.find(s), s) for s in self._stops if s in text]
        return min(found) if found else None



class ReasoningSplitter:
    """Splits streamed text into (content, reasoning) on <think>...</think>, holding back partial tags."""

    def __init__(self, thinking: bool) -> None:
        self.in_reasoning = thinking
        self._held = ""

    def feed(self, text: str) -> tuple[str, str]:
        content: list[str] = []
        reasoning: list[str] = []
        buf = self._held + text
        self._held = ""
        while buf:
            tag = THINK_CLOSE if self.in_reasoning else THINK_OPEN
            pos = buf.find(tag)
            if pos >= 0:
                (reasoning if self.in_reasoning else content).append(buf[:pos])
                buf = buf[pos + len(tag):]
                self.in_reasoning = not self.in_reasoning
                continue
            keep = held_prefix(buf, (tag,))
            (reasoning if self.in_reasoning else content).append(buf[: len(buf) - keep])
            self._held = buf[len(buf) - keep:]
            break
        return "".join(content), "".join(reasoning)

    def flush(self) -> tuple[str, str]:
        rest, self._held = self._held, ""
        return ("", rest) if self.in_reasoning else (rest, "")
