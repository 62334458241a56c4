"""Streaming text: an incremental detokenizer and a stop-string matcher that holds text back.

IncrementalDetokenizer emits only complete text: it decodes a short window of ids and waits while
the window ends in an incomplete UTF-8 sequence (U+FFFD), up to MAX_PENDING tokens. StopMatcher
never lets out text that contains a stop string, nor a tail that might start one.
"""

from __future__ import annotations

from collections.abc import Sequence

from router.tokenizer import TextCodec

PROMPT_CONTEXT_TOKENS = 4  # prompt tail decoded with the output, for leading-space rules
MAX_PENDING = 6             # a UTF-8 char is <= 4 bytes; longer stalls are emitted as is


class IncrementalDetokenizer:
    def __init__(self, codec: TextCodec, prompt_ids: Sequence[int]) -> None:
        self._codec = codec
        self._ids = list(prompt_ids[-PROMPT_CONTEXT_TOKENS:])
        self._prefix = len(self._ids)  # start of the decoded window
        self._read = len(self._ids)    # ids before this are emitted

    def push(self, token_id: int) -> str:
        """Text completed by this token ('' while a character is incomplete)."""
        self._ids.append(token_id)
        done = self._codec.decode(self._ids[self._prefix : self._read])
        text = self._codec.decode(self._ids[self._prefix :])
        pending = len(self._ids) - self._read
        if len(text) <= len(done) or (text.endswith("\ufffd") and pending < MAX_PENDING):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return text[len(done) :]

    def flush(self) -> str:
        """Whatever is still pending (with replacement characters), at the end of the stream."""
        if self._read == len(self._ids):
            return ""
        done = self._codec.decode(self._ids[self._prefix : self._read])
        text = self._codec.decode(self._ids[self._prefix :])
        self._prefix = self._read = len(self._ids)
        return text[len(done) :] if text.startswith(done) else text


class StopMatcher:
    """feed(text) -> (text safe to emit, stopped). After a stop, text up to the stop string is emitted."""

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = tuple(s for s in stops if s)
        self._held = ""

    def feed(self, text: str) -> tuple[str, bool]:
        buf = self._held + text
        hits = [i for i in (buf.find(s) for s in self._stops) if i >= 0]
        if hits:
            self._held = ""
            return buf[: min(hits)], True
        keep = self._partial_len(buf)
        self._held = buf[len(buf) - keep :] if keep else ""
        return buf[: len(buf) - keep], False

    def _partial_len(self, buf: str) -> int:
        """Longest tail of buf that is a proper prefix of a stop string."""
        best = 0
        for s in self._stops:
            for k in range(min(len(s) - 1, len(buf)), best, -1):
                if buf.endswith(s[:k]):
                    best = k
                    break
        return best

    def flush(self) -> str:
        held, self._held = self._held, ""
        return held
