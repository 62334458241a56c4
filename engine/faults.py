"""Fault injection for tests and drills: nothing on a production path calls this module.

`slow_steps(engine, seconds)` makes an AsyncEngine's every step start `seconds` late (holding a
request in a state long enough to cancel it there); `slow_steps(engine, 0)` takes the delay off.
Commands that arrive during the delay (an abort) are applied before the delayed step, as they would
be between two steps.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, cast

from engine.async_engine import AsyncEngine
from engine.engine import LLMEngine, StepOutput


class SlowSteps:
    """An LLMEngine stand-in whose `step()` sleeps first; everything else is the wrapped engine's."""

    def __init__(self, inner: LLMEngine, seconds: float, between_steps: Callable[[], None]) -> None:
        self.inner, self.seconds, self._between_steps = inner, seconds, between_steps

    def step(self) -> list[StepOutput]:
        time.sleep(self.seconds)
        self._between_steps()
        return self.inner.step()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def slow_steps(engine: AsyncEngine, seconds: float) -> None:
    """Delays each of `engine`'s steps by `seconds` (0: back to full speed)."""
    inner = unwrapped(engine.engine)
    if seconds <= 0:
        engine.engine = inner
        return
    apply_commands = engine._apply_commands  # runs on the engine thread, inside the delayed step
    wrapper = SlowSteps(inner, seconds, lambda: apply_commands(block=False))
    engine.engine = cast(LLMEngine, wrapper)  # duck-typed: steps late, otherwise the same engine


def unwrapped(engine: LLMEngine) -> LLMEngine:
    """The engine under a SlowSteps wrapper (or the engine itself)."""
    return engine.inner if isinstance(engine, SlowSteps) else engine
