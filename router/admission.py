"""Admission control: a bound on in-flight requests and on prompt tokens waiting for prefill."""

from __future__ import annotations


class Overloaded(Exception):
    """Answered as RESOURCE_EXHAUSTED at once."""


class DuplicateRequest(Exception):
    """Answered as ALREADY_EXISTS: workers key requests by id, so ids in flight must be unique."""


class Ticket:
    """One admitted request; prefill_done() and close() give its share back (idempotent)."""

    def __init__(self, owner: Admission, request_id: str, prompt_tokens: int) -> None:
        self._owner = owner
        self._request_id = request_id
        self._queued = prompt_tokens
        self._open = True

    def prefill_done(self) -> None:
        self._owner.queued_prompt_tokens -= self._queued
        self._queued = 0

    def close(self) -> None:
        if self._open:
            self.prefill_done()
            self._owner.inflight -= 1
            self._owner.request_ids.discard(self._request_id)
            self._open = False


class Admission:
    """A prompt larger than max_queued_prompt_tokens is still admitted when nothing else is queued."""

    def __init__(self, max_inflight: int, max_queued_prompt_tokens: int) -> None:
        self.max_inflight = max_inflight
        self.max_queued_prompt_tokens = max_queued_prompt_tokens
        self.inflight = 0
        self.queued_prompt_tokens = 0
        self.request_ids: set[str] = set()

    def admit(self, request_id: str, prompt_tokens: int) -> Ticket:
        if request_id in self.request_ids:
            raise DuplicateRequest(f"request_id: {request_id!r} is already in flight")
        if self.inflight >= self.max_inflight:
            raise Overloaded(f"too many requests in flight ({self.inflight}, max {self.max_inflight}); retry later")
        queued = self.queued_prompt_tokens
        if queued and queued + prompt_tokens > self.max_queued_prompt_tokens:
            raise Overloaded(
                f"prefill queue full ({queued} + {prompt_tokens} prompt tokens > "
                f"{self.max_queued_prompt_tokens}); retry later"
            )
        self.inflight += 1
        self.queued_prompt_tokens += prompt_tokens
        self.request_ids.add(request_id)
        return Ticket(self, request_id, prompt_tokens)
