"""Shared helpers: an independent float64 NumPy recurrence and a relative error metric."""

from __future__ import annotations

import os

# The tests' models are tiny: compiling them dominates the suite's time, and LLVM's optimisation of the compiled CPU
# code buys nothing at these sizes. Level 0 compiles about a third faster; the subprocess checks inherit it.
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"

import numpy as np
import pytest


def numpy_gated_delta_rule(q, k, v, g, beta, initial_state):
    """Float64 NumPy recurrence, written independently of the package (explicit per-example loops)."""
    q, k, v, g, beta, state = (np.asarray(x, np.float64) for x in (q, k, v, g, beta, initial_state))
    batch, length, heads, _ = q.shape
    state = state.copy()
    out = np.zeros(v.shape, np.float64)
    for b in range(batch):
        for h in range(heads):
            s = state[b, h]
            for t in range(length):
                s = np.exp(g[b, t, h]) * s
                s = s + beta[b, t, h] * np.outer(k[b, t, h], v[b, t, h] - s.T @ k[b, t, h])
                out[b, t, h] = s.T @ q[b, t, h]
            state[b, h] = s
    return out, state


def relative_error(actual, expected) -> float:
    """RMS(actual - expected) / RMS(expected), the per-tensor metric of flash-linear-attention's tests."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return float(np.sqrt(np.mean((actual - expected) ** 2)) / max(np.sqrt(np.mean(expected**2)), 1e-30))


def random_gdr_inputs(seed, batch=2, length=37, heads=3, d_k=16, d_v=8, gate_scale=1.0):
    """Inputs as a GDN layer produces them: unit-norm q and k, g <= 0, beta in (0, 1), a random start state."""
    rng = np.random.default_rng(seed)

    def unit(x):
        return x / np.linalg.norm(x, axis=-1, keepdims=True)

    return dict(
        q=unit(rng.normal(size=(batch, length, heads, d_k))).astype(np.float32),
        k=unit(rng.normal(size=(batch, length, heads, d_k))).astype(np.float32),
        v=rng.normal(size=(batch, length, heads, d_v)).astype(np.float32),
        g=(-gate_scale * rng.uniform(0.0, 1.0, size=(batch, length, heads))).astype(np.float32),
        beta=rng.uniform(0.0, 1.0, size=(batch, length, heads)).astype(np.float32),
        initial_state=rng.normal(size=(batch, heads, d_k, d_v)).astype(np.float32),
    )


@pytest.fixture
def gdr_inputs():
    return random_gdr_inputs(0)
