"""What the router needs from a tokenizer (engine.tokenizer.Tokenizer satisfies it)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol


class TextCodec(Protocol):
    """encode: prompt text -> token ids (as the model expects them); decode: ids -> text."""

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...
