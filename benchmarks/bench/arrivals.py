"""When each request is sent: all at once, or at a mean request rate with gamma-distributed gaps.

Gaps are Gamma(shape=burstiness, scale=1/(rate*burstiness)): mean 1/rate whatever the burstiness, and a
coefficient of variation of 1/sqrt(burstiness). burstiness 1 is a Poisson process (exponential gaps);
under 1 requests come in bursts, over 1 more evenly; inf is a fixed gap. As in vLLM's `bench serve`, the
offsets are rescaled so the last request is sent at num_requests/rate: runs with different seeds then
offer the same load."""

from __future__ import annotations

import math

import numpy as np


def arrival_offsets(num_requests: int, rate: float, burstiness: float = 1.0, seed: int = 0) -> list[float]:
    """Seconds from the start of the run at which each request is sent (non-decreasing)."""
    if burstiness <= 0:
        raise ValueError(f"burstiness must be positive, got {burstiness}")
    if rate <= 0:
        raise ValueError(f"request rate must be positive, got {rate}")
    if num_requests == 0:
        return []
    if math.isinf(rate):
        return [0.0] * num_requests
    if math.isinf(burstiness):
        gaps = np.full(num_requests, 1.0 / rate)
    else:
        gaps = np.random.default_rng(seed).gamma(
            shape=burstiness, scale=1.0 / (rate * burstiness), size=num_requests
        )
    offsets = np.cumsum(gaps)
    offsets *= (num_requests / rate) / offsets[-1]
    return offsets.tolist()
