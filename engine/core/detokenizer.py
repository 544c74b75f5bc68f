"""Incremental detokenization: a request's text grows with its tokens without decoding the
whole output every step (the decode window starts a few tokens back, so a multi-byte
character split across tokens appears once it is complete)."""

from __future__ import annotations

from typing import Callable, Optional


class IncrementalDetokenizer:
    def __init__(self, decode: Callable[[list[int]], str]) -> None:
        self._decode = decode
        self.text = ""
        # Tokens whose text is in ``text`` (the read offset) and where the decode window starts.
        self.read_offset = 0
        self._prefix_offset = 0
        # Set when a stop string cut the text: text[:limit] is the output.
        self.limit: Optional[int] = None

    def advance(self, ids: list[int], upto: int) -> str:
        """Bring ``text`` up to ``ids[:upto]``; returns the new text ("" while the newest
        bytes are an incomplete character)."""
        if upto <= self.read_offset:
            return ""
        prefix_text = self._decode(ids[self._prefix_offset:self.read_offset])
        new_text = self._decode(ids[self._prefix_offset:upto])
        if len(new_text) <= len(prefix_text) or new_text.endswith("\ufffd"):
            return ""
        delta = new_text[len(prefix_text):]
        self.text += delta
        self._prefix_offset, self.read_offset = self.read_offset, upto
        return delta

    def flush(self, ids: list[int]) -> None:
        """At the end of a request: the rest, even an incomplete character (as a full decode
        of the ids would show it)."""
        if self.read_offset < len(ids):
            self.text += self._decode(ids[self.read_offset:])
            self._prefix_offset = self.read_offset = len(ids)

    def output_text(self) -> str:
        return self.text if self.limit is None else self.text[:self.limit]
