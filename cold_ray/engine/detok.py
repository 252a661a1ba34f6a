"""Incremental detokenisation with stop strings, for streaming, in O(1) amortised per token.

Each step decodes a small window of the newest tokens, not the whole output (vLLM's prefix /
read offsets). The window starts at a token boundary where the text was complete, with at
least one token of already-emitted context before the new ones: decoders treat the start of
a text specially (Llama's `Strip` drops the first leading space, SentencePiece's Metaspace
its prefix space), and a delta is taken as `decode(context + new)[len(decode(context)):]`,
so those start effects fall on the context, never on the new text.

Text is held back while
- it ends in an incomplete UTF-8 sequence (U+FFFD while the next bytes may complete it),
- the last token is a byte-fallback token (`<0xE4>`): the decoder turns a whole run of byte
  tokens into text at once, and one invalid byte anywhere in the run makes every byte of it
  U+FFFD, so the run's text is final only when a token that is neither a byte nor a skipped
  special token (or the end) closes it,
- its tail could still become the start of a stop string, so a client never sees part of a
  stop string; text from a stop string on is cut.
Concatenated deltas plus `flush()` equal `tokenizer.decode(ids, skip_special_tokens=True)`
up to the first stop string.
"""

from __future__ import annotations

import re
import weakref

_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")
_WINDOW = 16  # tokens a window may span before its start moves up to recent context
_vocab_ids: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _special_and_byte_ids(tokenizer) -> tuple[frozenset[int], frozenset[int]]:
    """(special ids, byte-fallback ids), found once per tokenizer (~25 ms for 49k tokens)."""
    found = _vocab_ids.get(tokenizer)
    if found is None:
        added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
        special = {i for i, t in added.items() if getattr(t, "special", False)}
        special |= set(tokenizer.all_special_ids)
        vocab = tokenizer.get_vocab()
        byte = {i for t, i in vocab.items() if len(t) == 6 and _BYTE_TOKEN.fullmatch(t)}
        found = frozenset(special - byte), frozenset(byte)
        _vocab_ids[tokenizer] = found
    return found


def byte_fallback_ids(tokenizer) -> frozenset[int]:
    """Ids of the tokenizer's byte-fallback tokens (`<0x00>`..`<0xFF>`); empty for byte-level
    BPE (GPT-2 style) vocabularies."""
    return _special_and_byte_ids(tokenizer)[1]


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas (see the module docstring)."""

    def __init__(self, tokenizer, stop: tuple[str, ...]):
        self.tokenizer = tokenizer
        self.stop = tuple(stop)
        self.holdback = max((len(s) for s in self.stop), default=1) - 1
        self.ids: list[int] = []
        self.stopped = False
        self._start = 0  # window start: a clean boundary, decode(ids[_start:]) is the window
        self._read = 0  # tokens whose text has been handed on
        self._chunk = 0  # where the latest hand-on that produced text began (next start)
        self._window_text = ""  # decode(ids[_start:_read])
        self._pending = ""  # handed-on text not yet emitted (it may begin a stop string)
        self._emitted: list[str] = []
        self._special_ids, self._byte_ids = _special_and_byte_ids(tokenizer)
        self._byte_run = False  # the last token that is not special is a byte-fallback token

    @property
    def text(self) -> str:
        """All text decoded so far (up to a stop string), emitted or held back."""
        return "".join(self._emitted) + self._pending

    def add(self, token_id: int) -> str:
        """Append one token; return the new text that is safe to emit."""
        if self.stopped:
            return ""
        self.ids.append(token_id)
        if token_id in self._byte_ids:
            self._byte_run = True  # an open run of byte tokens: its text may still change
            return ""
        if token_id in self._special_ids:
            if self._byte_run:
                return ""  # the decoder skips it, so the byte run goes on across it
        else:
            self._byte_run = False
        window = self._decode(self.ids[self._start :])
        if window.endswith("\ufffd"):
            return ""  # a multi-byte character is not complete yet
        new = window[len(self._window_text) :]
        if new:
            self._chunk = self._read
        self._window_text = window
        self._read = len(self.ids)
        if self._read - self._start > _WINDOW and self._chunk > self._start:
            self._move_start()
        return self._emit(new)

    def flush(self) -> str:
        """Everything not yet emitted (at the end of the request), incomplete bytes too."""
        new = ""
        if not self.stopped and self._read < len(self.ids):
            new = self._decode(self.ids[self._start :])[len(self._window_text) :]
            self._read = len(self.ids)
        delta = self._emit(new)
        rest, self._pending = self._pending, ""
        self._emitted.append(rest)
        return delta + rest

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(
            ids, skip_special_tokens=True, clean_up_tokenization_spaces=False
        )

    def _move_start(self) -> None:
        """Restart the window at the latest text chunk, which stays as context (its text must
        be non-empty, so that the decoder's start-of-text effects fall on it)."""
        context = self._decode(self.ids[self._chunk : self._read])
        if context:
            self._start, self._window_text = self._chunk, context

    def _emit(self, new: str) -> str:
        """Add handed-on text; return what may reach the client now (cut at a stop string)."""
        if self.stopped:
            return ""
        pending = self._pending + new
        if self.stop:
            # any stop string not found yet ends in `new`, so it starts inside `pending`
            hits = [i for s in self.stop if (i := pending.find(s)) >= 0]
            if hits:
                self.stopped = True
                self._pending = ""
                delta = pending[: min(hits)]
                self._emitted.append(delta)
                return delta
        safe = len(pending) - self.holdback
        if safe <= 0:
            self._pending = pending
            return ""
        delta, self._pending = pending[:safe], pending[safe:]
        self._emitted.append(delta)
        return delta
