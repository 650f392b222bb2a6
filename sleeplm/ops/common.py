"""Helpers shared by the gated-delta-rule implementations."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def compute_dtype(*arrays: jax.Array) -> jnp.dtype:
    """float32, or float64 if any input is float64 (never lower than float32: decays and state need it)."""
    return jnp.result_type(jnp.float32, *(a.dtype for a in arrays))
