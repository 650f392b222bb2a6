"""RMS normalisation layers (computed in float32)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from sleeplm.model.params import param


def rms_normalize(x: jax.Array, eps: float) -> jax.Array:
    x32 = x.astype(jnp.float32)
    return x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)


def l2_normalize(x: jax.Array, eps: float = 1e-6) -> jax.Array:
    x32 = x.astype(jnp.float32)
    return (x32 * jax.lax.rsqrt(jnp.sum(x32 * x32, axis=-1, keepdims=True) + eps)).astype(x.dtype)


class RMSNorm(nn.Module):
    """RMSNorm over the last axis with a learned scale w; `zero_centered`: the scale applied is 1 + w, w starting
    at 0 (the Qwen3-Next family's layout, where weight decay pulls towards the identity)."""

    eps: float = 1e-6
    zero_centered: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        init = nn.initializers.zeros if self.zero_centered else nn.initializers.ones
        scale = param(self, "scale", init, (x.shape[-1],), (None,))
        return (rms_normalize(x, self.eps) * (1.0 + scale if self.zero_centered else scale)).astype(x.dtype)


class GatedRMSNorm(nn.Module):
    """RMSNorm over the last axis (per head), scaled and gated by silu(gate): the GDN output norm."""

    eps: float = 1e-6

    @nn.compact
    def __call__(self, x: jax.Array, gate: jax.Array) -> jax.Array:
        scale = param(self, "scale", nn.initializers.ones, (x.shape[-1],), (None,))
        return (rms_normalize(x, self.eps) * scale * nn.silu(gate.astype(jnp.float32))).astype(x.dtype)
