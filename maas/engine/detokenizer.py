"""Turn a sequence's tokens into text as they arrive, and catch stop strings.

Text is decoded incrementally (a token may be half of a character: nothing is shown until the
character is whole). With stop strings, the last few characters are held back until it is
clear they do not begin one, so a stop string is never shown, even split across tokens.
"""

from __future__ import annotations


class Detokenizer:
    def __init__(self, tokenizer, stop: tuple[str, ...]) -> None:
        self._tokenizer = tokenizer
        self._stop = tuple(s for s in stop if s)
        self._holdback = max((len(s) for s in self._stop), default=1) - 1
        self._ids: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0
        self.text = ""
        """All text so far (up to a stop string, once one is found)."""
        self._emitted = 0
        self.stopped = False

    def add(self, token_id: int, *, find_stops: bool = True) -> str:
        """Take one token; return the text that may now be shown. ``find_stops=False`` (before
        min_tokens) lets stop strings pass, as vLLM does."""
        self._ids.append(token_id)
        self._decode(complete=False, find_stops=find_stops)
        limit = len(self.text) if self.stopped else len(self.text) - self._holdback
        return self._take(limit)

    def flush(self) -> str:
        """The rest of the text, when the sequence ends for another reason (a character left
        incomplete reads as U+FFFD, as in a decode of all the tokens)."""
        if not self.stopped:
            self._decode(complete=True)
        return self._take(len(self.text))

    def _decode(self, *, complete: bool, find_stops: bool = True) -> None:
        before = self._tokenizer.decode(self._ids[self._prefix_offset : self._read_offset])
        after = self._tokenizer.decode(self._ids[self._prefix_offset :])
        if len(after) > len(before) and (complete or not after.endswith("\ufffd")):
            self.text += after[len(before) :]
            self._prefix_offset = self._read_offset
            self._read_offset = len(self._ids)
        if find_stops:
            self._find_stop()

    def _find_stop(self) -> None:
        if not self._stop:
            return
        start = max(0, self._emitted - self._holdback)
        found = [i for i in (self.text.find(s, start) for s in self._stop) if i >= 0]
        if found:
            self.text = self.text[: min(found)]
            self.stopped = True

    def _take(self, limit: int) -> str:
        if limit <= self._emitted:
            return ""
        piece = self.text[self._emitted : limit]
        self._emitted = limit
        return piece
