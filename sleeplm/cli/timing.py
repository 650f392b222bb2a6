"""Wall-clock timing of JAX calls (for benchmarks and demos; never for tests)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import jax


def median_seconds(fn: Callable, *args, repeats: int = 5, warmup: bool = True) -> float:
    """Median wall time of fn(*args), waiting for its results; first one untimed call (compile, warm-up)."""
    if warmup:
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)
