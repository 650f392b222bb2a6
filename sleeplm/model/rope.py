"""Rotary position embeddings (half-split layout), computed in float32."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def apply_rope(x: jax.Array, positions: jax.Array, theta: float, rotary_dim: int | None = None) -> jax.Array:
    """Rotates the first `rotary_dim` dims (all by default) of x (B, T, H, d) by the angles of integer `positions`,
    (T,) for every row or (B, T) per row; the other dims pass through (partial rotary, as in the Qwen3-Next family)."""
    rotary_dim = x.shape[-1] if rotary_dim is None else rotary_dim
    half = rotary_dim // 2
    inv_freq = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # (..., T, half)
    sin, cos = jnp.sin(angles)[..., None, :], jnp.cos(angles)[..., None, :]  # broadcast over heads
    x32 = x.astype(jnp.float32)
    x1, x2, rest = x32[..., :half], x32[..., half:rotary_dim], x32[..., rotary_dim:]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], axis=-1).astype(x.dtype)
