"""Incremental detokenisation with stop strings, for streaming."""

from __future__ import annotations


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas.

    Text is held back while it ends in an incomplete UTF-8 sequence, and while its tail could
    still become the start of a stop string, so a client never sees part of a stop string.
    """

    def __init__(self, tokenizer, stop: tuple[str, ...]):
        self.tokenizer = tokenizer
        self.stop = stop
        self.holdback = max((len(s) for s in stop), default=1) - 1
        self.ids: list[int] = []
        self.text = ""  # all text decoded so far (up to a stop string)
        self.sent = 0  # characters already emitted
        self.stopped = False

    def add(self, token_id: int) -> str:
        """Append one token; return the new text that is safe to emit."""
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # a multi-byte character is not complete yet
            return ""
        self.text = text
        if self.stop:
            start = max(0, self.sent - self.holdback - 1)
            hits = [i for s in self.stop if (i := text.find(s, start)) >= 0]
            if hits:
                self.text = text[: min(hits)]
                self.stopped = True
                return self.flush()
        safe = len(self.text) - self.holdback if self.stop else len(self.text)
        if safe <= self.sent:
            return ""
        delta = self.text[self.sent : safe]
        self.sent = safe
        return delta

    def flush(self) -> str:
        """Everything not yet emitted (at the end of the request)."""
        delta = self.text[self.sent :]
        self.sent = len(self.text)
        return delta
