"""Stop strings over a token stream, checked incrementally: one matcher for the engine and the router.

Each step looks only at the new text plus a tail as long as the longest stop string minus one, so a
request's stop checks cost O(output) in all, not O(output^2).

  IncrementalDetokenizer  token ids -> text, one token at a time; decodes a short window of ids and
                          holds text back while the window ends in an incomplete UTF-8 sequence
                          (U+FFFD), up to MAX_PENDING tokens.
  StopMatcher             text -> (text safe to emit, stopped); never lets out a stop string nor a
                          tail that might start one. The router streams what it lets out.
  StopChecker             the engine's question for one request: has the output text (decoded
                          without the prompt, as a whole decode would read) reached a stop string?
  StopStrings             an engine's StopCheckers, one per running request with stop strings.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

PROMPT_CONTEXT_TOKENS = 4  # prompt tail decoded with the output, for leading-space rules
MAX_PENDING = 6             # a UTF-8 char is <= 4 bytes; longer stalls are emitted as is
REPLACEMENT_CHAR = "\ufffd"


class Decoder(Protocol):
    """ids -> text (engine.tokenizer.Tokenizer and the router's TextCodec satisfy it)."""

    def decode(self, ids: Sequence[int]) -> str: ...


class IncrementalDetokenizer:
    def __init__(self, decoder: Decoder, prompt_ids: Sequence[int] = ()) -> None:
        self._decoder = decoder
        self._ids = list(prompt_ids[-PROMPT_CONTEXT_TOKENS:])
        self._prefix = len(self._ids)  # start of the decoded window
        self._read = len(self._ids)    # ids before this are emitted
        self.held = ""                 # text of the ids not emitted yet (may end in U+FFFD)

    def push(self, token_id: int) -> str:
        """Text completed by this token ('' while a character is incomplete)."""
        self._ids.append(token_id)
        done = self._decoder.decode(self._ids[self._prefix : self._read])
        text = self._decoder.decode(self._ids[self._prefix :])
        pending = len(self._ids) - self._read
        if len(text) <= len(done) or (text.endswith(REPLACEMENT_CHAR) and pending < MAX_PENDING):
            self.held = text[len(done) :]
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        self.held = ""
        return text[len(done) :]

    def flush(self) -> str:
        """Whatever is still pending (with replacement characters), at the end of the stream."""
        if self._read == len(self._ids):
            return ""
        done = self._decoder.decode(self._ids[self._prefix : self._read])
        text = self._decoder.decode(self._ids[self._prefix :])
        self._prefix = self._read = len(self._ids)
        self.held = ""
        return text[len(done) :] if text.startswith(done) else text


class StopMatcher:
    """feed(text) -> (text safe to emit, stopped). After a stop, text up to the stop string is emitted.

    Between feeds it keeps at most len(longest stop) - 1 characters: a stop string that spans feeds
    starts in that tail."""

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = tuple(s for s in stops if s)
        self._held = ""

    def feed(self, text: str) -> tuple[str, bool]:
        buf = self._held + text
        hit = self._first_stop(buf)
        if hit is not None:
            self._held = ""
            return buf[:hit], True
        keep = self._partial_len(buf)
        self._held = buf[len(buf) - keep :] if keep else ""
        return buf[: len(buf) - keep], False

    def would_stop(self, text: str) -> bool:
        """Whether the held tail + `text` contains a stop string; keeps nothing (for text that may
        still change, such as a detokenizer's held-back text)."""
        return self._first_stop(self._held + text) is not None

    def flush(self) -> str:
        held, self._held = self._held, ""
        return held

    def _first_stop(self, buf: str) -> int | None:
        hits = [i for i in (buf.find(s) for s in self._stops) if i >= 0]
        return min(hits) if hits else None

    def _partial_len(self, buf: str) -> int:
        """Longest tail of buf that is a proper prefix of a stop string."""
        best = 0
        for s in self._stops:
            for k in range(min(len(s) - 1, len(buf)), best, -1):
                if buf.endswith(s[:k]):
                    best = k
                    break
        return best


def truncate_at_stop(text: str, stops: Sequence[str]) -> str:
    """The text cut before the first stop string (all of it when there is none)."""
    matcher = StopMatcher(stops)
    emit, stopped = matcher.feed(text)
    return emit if stopped else emit + matcher.flush()


class StopChecker:
    """Whether one request's output text contains a stop string, fed the output ids step by step.

    The text is the output decoded without the prompt, as the engine's finished text reads; text a
    detokenizer still holds back (an incomplete character) counts too, as it would in a whole decode.
    """

    def __init__(self, stops: tuple[str, ...], decoder: Decoder) -> None:
        self.stops = stops
        self._detok = IncrementalDetokenizer(decoder)
        self._matcher = StopMatcher(stops)
        self._seen = 0  # output ids already fed

    def update(self, output_ids: Sequence[int]) -> bool:
        """Feeds the ids after the ones seen so far; True once a stop string is in the text."""
        for token in output_ids[self._seen :]:
            self._seen += 1
            if self._matcher.feed(self._detok.push(token))[1]:
                return True
        return self._matcher.would_stop(self._detok.held)


class StopStrings:
    """An engine's stop-string checks: one StopChecker per request id, made on its first check."""

    def __init__(self, decoder: Decoder) -> None:
        self._decoder = decoder
        self._checkers: dict[str, StopChecker] = {}

    def reached(self, request_id: str, stops: tuple[str, ...], output_ids: Sequence[int]) -> bool:
        checker = self._checkers.get(request_id)
        if checker is None or checker.stops != stops:
            checker = self._checkers[request_id] = StopChecker(stops, self._decoder)
        return checker.update(output_ids)

    def forget(self, request_id: str) -> None:
        """The request finished or was aborted (a later check under its id starts afresh)."""
        self._checkers.pop(request_id, None)
