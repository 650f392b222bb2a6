"""Gated DeltaNet mixer (SPEC §2): q, k, v projections (optional causal short convolution, zero-padded at each
window start), unit-norm silu q and k, decay g and write strength beta per head, the gated delta rule over the
fast weights S, a gated RMSNorm per head and the output projection."""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from sleeplm.config import ModelConfig
from sleeplm.model.norms import GatedRMSNorm, l2_normalize
from sleeplm.ops import gated_delta_rule
from sleeplm.state import FastWeightState


def _a_log_init(key: jax.Array, shape: tuple[int, ...], dtype=jnp.float32) -> jax.Array:
    """A ~ U(1, 16) per head, stored as log A (as in Mamba-2 / GDN)."""
    return jnp.log(jax.random.uniform(key, shape, dtype, 1.0, 16.0))


def _dt_bias_init(key: jax.Array, shape: tuple[int, ...], dtype=jnp.float32) -> jax.Array:
    """softplus(dt_bias) = dt with dt log-uniform in [1e-3, 1e-1]."""
    dt = jnp.exp(jax.random.uniform(key, shape, dtype, math.log(1e-3), math.log(1e-1)))
    return dt + jnp.log(-jnp.expm1(-dt))


def causal_short_conv(x: jax.Array, history: jax.Array, kernel: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Depthwise causal convolution of x (B, n, C) continuing from `history` (B, width - 1, C).

    Returns the outputs (B, n, C) and the new history (the last width - 1 inputs).
    """
    width = kernel.shape[0]
    padded = jnp.concatenate([history.astype(x.dtype), x], axis=1)
    length = x.shape[1]
    out = sum(padded[:, j : j + length] * kernel[j].astype(x.dtype) for j in range(width))
    return out, padded[:, length:]


class GatedDeltaNet(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self, x: jax.Array, state: FastWeightState, pos: jax.Array) -> tuple[jax.Array, FastWeightState]:
        """x: (B, n, d) for window positions pos .. pos + n - 1, continuing from the fast weights in `state`."""
        cfg = self.config
        batch, length, _ = x.shape
        heads, d_k, d_v = cfg.gdn_num_heads, cfg.gdn_dim_k, cfg.gdn_dim_v
        dense = lambda features, name: nn.Dense(features, use_bias=False, dtype=x.dtype, name=name)
        qkv = jnp.concatenate(
            [dense(heads * d_k, "q")(x), dense(heads * d_k, "k")(x), dense(heads * d_v, "v")(x)], axis=-1
        )
        conv = state.conv
        if cfg.short_conv:
            kernel = self.param("conv", nn.initializers.lecun_normal(), (cfg.conv_width, qkv.shape[-1]))
            history = jnp.where(pos > 0, state.conv, 0)  # zero padding at every window start
            qkv, conv = causal_short_conv(qkv, history, kernel)
        q, k, v = jnp.split(qkv, [heads * d_k, 2 * heads * d_k], axis=-1)
        q = l2_normalize(nn.silu(q).reshape(batch, length, heads, d_k))
        k = l2_normalize(nn.silu(k).reshape(batch, length, heads, d_k))
        v = v.reshape(batch, length, heads, d_v)

        a_log = self.param("A_log", _a_log_init, (heads,))
        dt_bias = self.param("dt_bias", _dt_bias_init, (heads,))
        decay_input = nn.Dense(heads, use_bias=False, dtype=jnp.float32, name="a")(x).astype(jnp.float32)
        g = -jnp.exp(a_log) * jax.nn.softplus(decay_input + dt_bias)
        beta = jax.nn.sigmoid(nn.Dense(heads, use_bias=False, dtype=jnp.float32, name="b")(x).astype(jnp.float32))

        out, fast_weights = gated_delta_rule(
            q, k, v, g, beta, state.S, implementation=cfg.gdn_implementation, chunk_size=cfg.gdn_chunk_size
        )
        gate = dense(heads * d_v, "gate")(x).reshape(batch, length, heads, d_v)
        out = GatedRMSNorm(cfg.norm_eps, name="out_norm")(out, gate).reshape(batch, length, heads * d_v)
        return dense(cfg.d_model, "o")(out), FastWeightState(fast_weights, conv)
