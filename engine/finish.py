"""Why a request's stream ended: the `finish_reason` of its last StepOutput."""

from __future__ import annotations

from enum import StrEnum


class FinishReason(StrEnum):
    """A str enum, so a reason still equals (and prints as) its old string."""

    STOP = "stop"  # eos, a stop token or a stop string
    LENGTH = "length"  # max_tokens or the context window
    PREFILLED = "prefilled"  # prefill role: first token sampled, the KV is held for a decode
    ABORT = "abort"  # aborted (cancel, release), blocks freed
    ERROR = "error"  # the engine refused the request or died
