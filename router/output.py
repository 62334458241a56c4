"""Turns token batches from the workers into GenerateResponse messages for one request.

The router re-checks what ends a request (max_tokens, EOS, stop strings on its own detokenized
text) so that the text never contains a stop string and never runs past max_tokens, whatever the
worker does; when it finishes first it tells the caller to cancel the worker's stream.
"""

from __future__ import annotations

from collections.abc import Sequence

from pdserve.v1 import router_pb2, worker_pb2

from engine.stop import IncrementalDetokenizer, StopMatcher
from router.tokenizer import TextCodec
from router.validate import Prepared

FinishReason = router_pb2.FinishReason
_FROM_WORKER = {
    worker_pb2.FINISH_STOP: router_pb2.STOP,
    worker_pb2.FINISH_LENGTH: router_pb2.LENGTH,
    worker_pb2.FINISH_ABORT: router_pb2.ABORT,
}


class OutputState:
    def __init__(self, prep: Prepared, codec: TextCodec | None, eos_ids: Sequence[int]) -> None:
        self.prep = prep
        self._detok = IncrementalDetokenizer(codec, prep.prompt_ids) if codec is not None else None
        self._stop = StopMatcher(prep.stop)
        self._eos = frozenset() if prep.sampling.ignore_eos else frozenset(eos_ids)
        self.completion_tokens = 0
        self.finish: int = router_pb2.FINISH_REASON_UNSPECIFIED
        self._text_done = False  # a stop string was found: no more text

    @property
    def finished(self) -> bool:
        return self.finish != router_pb2.FINISH_REASON_UNSPECIFIED

    def accept(self, token_ids: Sequence[int], logprobs: Sequence[float],
               worker_finish: int = worker_pb2.FINISH_NONE) -> router_pb2.GenerateResponse:
        """The message for this batch; sets `finish` when the request is over."""
        msg = router_pb2.GenerateResponse(request_id=self.prep.request_id)
        text: list[str] = []
        for i, token in enumerate(token_ids):
            msg.token_ids.append(token)
            if self.prep.logprobs and i < len(logprobs):
                msg.logprobs.append(logprobs[i])
            self.completion_tokens += 1
            self.finish = self._take(token, text)
            if self.finished:
                break
        if not self.finished and worker_finish != worker_pb2.FINISH_NONE:
            self.finish = _FROM_WORKER.get(worker_finish, router_pb2.ABORT)
        if self.finished:
            self._close(text, msg)
        msg.text = "".join(text)
        return msg

    def _take(self, token: int, text: list[str]) -> int:
        """Adds the token's text; the finish reason it causes, if any."""
        if token in self._eos:
            return router_pb2.STOP
        piece = self._detok.push(token) if self._detok is not None else ""
        emit, stopped = self._stop.feed(piece)
        text.append(emit)
        if stopped:
            self._text_done = True
            return router_pb2.STOP
        if self.completion_tokens >= self.prep.sampling.max_tokens:
            return router_pb2.LENGTH
        return router_pb2.FINISH_REASON_UNSPECIFIED

    def _close(self, text: list[str], msg: router_pb2.GenerateResponse) -> None:
        if not self._text_done:
            tail = self._detok.flush() if self._detok is not None else ""
            emit, stopped = self._stop.feed(tail)
            text.append(emit if stopped else emit + self._stop.flush())
            if stopped:
                self.finish = router_pb2.STOP
        msg.finish_reason = self.finish  # type: ignore[assignment]
        msg.usage.prompt_tokens = len(self.prep.prompt_ids)
        msg.usage.completion_tokens = self.completion_tokens
