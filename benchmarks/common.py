"""Benchmark helpers: timing of jitted functions and a record of where a number came from."""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import jax


def time_call(fn: Callable, *args, repeats: int = 5) -> float:
    """Median wall time (s) of fn(*args) after one compile-and-warm-up call."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def provenance() -> dict:
    """The command, commit and machine a measurement was taken with."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout
        dirty = subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True, check=True).stdout
        commit = commit.strip() + ("+uncommitted" if dirty.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    device = jax.devices()[0]
    return {
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "commit": commit,
        "machine": f"{platform.machine()} {platform.processor() or ''} {os.cpu_count()} cpus".strip(),
        "device": f"{device.platform}:{device.device_kind}",
        "jax": jax.__version__,
    }
