"""When each request is sent: Poisson arrivals (exponential gaps) at a rate, seeded."""

from __future__ import annotations

import math
import random


def arrival_offsets(n: int, rate: float, seed: int = 0) -> list[float]:
    """Seconds from the run's start at which request i is sent; all zeros when rate is inf."""
    if math.isinf(rate):
        return [0.0] * n
    rng = random.Random(seed)
    t, out = 0.0, []
    for _ in range(n):
        out.append(t)
        t += rng.expovariate(rate)
    return out
