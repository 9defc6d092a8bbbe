"""Shared timing helper of the benchmark scripts (run them as `python bench/NAME.py`)."""

from __future__ import annotations

import time
from typing import Callable


def best(function: Callable[[], object], repeats: int) -> float:
    """Seconds of the fastest of ``repeats`` calls, after one warm-up call."""
    function()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return min(times)
