"""Gated DeltaNet mixer (docs/method.md, "The model"): q, k, v projections (optional causal short convolution,
zero-padded at each window start), unit-norm silu q and k, decay g and write strength beta per head, the gated delta
rule over the fast weights S, a gated RMSNorm per head and the output projection."""

from __future__ import annotations

import math
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from sleeplm.config import Config, ModelConfig
from sleeplm.eviction import Eviction
from sleeplm.model.mixer import Mixer, WindowContext, axes_like
from sleeplm.model.norms import GatedRMSNorm, l2_normalize
from sleeplm.model.params import dense, param
from sleeplm.ops import gated_delta_rule


class FastWeightState(NamedTuple):
    """One Gated DeltaNet layer: `S` (B, H, d_k, d_v) float32, and the short convolution's last inputs of the
    current window, `conv` (B, width - 1, channels) (None without short convolution)."""

    S: jax.Array
    conv: jax.Array | None


def _a_log_init(key: jax.Array, shape: tuple[int, ...], dtype=jnp.float32) -> jax.Array:
    """A ~ U(1, 16) per head, stored as log A (as in Mamba-2 / GDN)."""
    return jnp.log(jax.random.uniform(key, shape, dtype, 1.0, 16.0))


def _dt_bias_init(key: jax.Array, shape: tuple[int, ...], dtype=jnp.float32) -> jax.Array:
    """softplus(dt_bias) = dt with dt log-uniform in [1e-3, 1e-1]."""
    dt = jnp.exp(jax.random.uniform(key, shape, dtype, math.log(1e-3), math.log(1e-1)))
    return dt + jnp.log(-jnp.expm1(-dt))


def causal_short_conv(
    x: jax.Array, history: jax.Array, kernel: jax.Array, valid_count: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Depthwise causal convolution of x (B, n, C) continuing from `history` (B, width - 1, C).

    Returns the outputs (B, n, C) and each row's new history: the last width - 1 inputs up to its `valid_count`
    (B,) real tokens (padding after them is not history).
    """
    width = kernel.shape[0]
    padded = jnp.concatenate([history.astype(x.dtype), x], axis=1)
    length = x.shape[1]
    out = sum(padded[:, j : j + length] * kernel[j].astype(x.dtype) for j in range(width))
    last = valid_count[:, None] + jnp.arange(width - 1)  # (B, width - 1) indices into padded
    return out, jnp.take_along_axis(padded, last[:, :, None], axis=1)


def gdn_flops_per_token(config: Config, key_heads: int) -> float:
    """One token's FLOPs in a Gated DeltaNet layer whose queries and keys have `key_heads` heads: the q, k, v,
    gate, a, b and output projections, and the chunked gated delta rule per value head."""
    m = config.model
    d, heads, d_k, d_v = m.d_model, m.gdn_heads, m.gdn_head_dim_k, m.gdn_head_dim_v
    chunk = min(m.gdn_chunk_size, config.sleep.window)
    projections = 2 * d * (2 * key_heads * d_k + 2 * heads * d_v + 2 * heads) + 2 * heads * d_v * d
    return projections + 2 * heads * (chunk * (3 * d_k + 2 * d_v) + 3 * d_k * d_v)


class GatedDeltaNet(Mixer):
    @classmethod
    def check_config(cls, model: ModelConfig) -> None:
        if model.gdn_key_heads != model.gdn_heads:
            raise ValueError(
                f"gdn_key_heads={model.gdn_key_heads!r} is invalid for the 'gdn' kind: its queries and keys have the "
                f"gdn_heads={model.gdn_heads} heads of its values (the 'grouped_gdn' kind shares key heads)"
            )

    @classmethod
    def forward_flops_per_token(cls, config: Config) -> float:
        return gdn_flops_per_token(config, config.model.gdn_heads)

    @classmethod
    def silence(cls, params: dict) -> dict:
        """A zero output projection: the block adds nothing until training moves it."""
        return {**params, "o": {**params["o"], "kernel": jnp.zeros_like(params["o"]["kernel"])}}

    @classmethod
    def init_cache(cls, config: Config, batch: int, capacity: int) -> FastWeightState:
        model = config.model
        heads, d_k, d_v = model.gdn_heads, model.gdn_head_dim_k, model.gdn_head_dim_v
        channels = heads * (2 * d_k + d_v)
        conv = jnp.zeros((batch, model.conv_width - 1, channels), model.dtype) if model.short_conv else None
        return FastWeightState(jnp.zeros((batch, heads, d_k, d_v), jnp.float32), conv)

    @classmethod
    def evict(cls, cache: FastWeightState, eviction: Eviction) -> FastWeightState:
        """S survives every window end; the short convolution's inputs never cross one."""
        return cache._replace(conv=None if cache.conv is None else jnp.zeros_like(cache.conv))

    @classmethod
    def cache_axes(cls, cache: FastWeightState) -> FastWeightState:
        return FastWeightState(
            axes_like(cache.S, "batch", "heads", None, None), axes_like(cache.conv, "batch", None, None)
        )

    @classmethod
    def split_sizes(cls, model: ModelConfig) -> dict[str, dict[str, int]]:
        return {"heads": {"model.gdn_heads": model.gdn_heads}}

    @nn.compact
    def __call__(
        self, x: jax.Array, state: FastWeightState, context: WindowContext
    ) -> tuple[jax.Array, FastWeightState]:
        """x: (B, n, d) for window positions pos .. pos + n - 1, continuing from the fast weights in `state`."""
        q, k, v, conv = self.queries_keys_values(x, state, context)
        return self.delta_rule_output(x, q, k, v, state, context, conv)

    def queries_keys_values(self, x: jax.Array, state: FastWeightState, context: WindowContext):
        """(q, k, v) per value head (B, n, H, d_k / d_v), q and k unit-norm, and the short convolution's history."""
        cfg = self.config.model
        batch, length, _ = x.shape
        heads, d_k, d_v = cfg.gdn_heads, cfg.gdn_head_dim_k, cfg.gdn_head_dim_v
        projection = lambda features, name: dense(features, ("embed", "heads"), name, x.dtype)
        qkv = jnp.concatenate(
            [projection(heads * d_k, "q")(x), projection(heads * d_k, "k")(x), projection(heads * d_v, "v")(x)],
            axis=-1,
        )
        conv = state.conv
        if cfg.short_conv:
            kernel = param(self, "conv", nn.initializers.lecun_normal(), (cfg.conv_width, qkv.shape[-1]), (None, None))
            history = jnp.where(context.pos[:, None, None] > 0, state.conv, 0)  # zero padding at every window start
            qkv, conv = causal_short_conv(qkv, history, kernel, jnp.sum(context.valid, axis=1))
        q, k, v = jnp.split(qkv, [heads * d_k, 2 * heads * d_k], axis=-1)
        q = l2_normalize(nn.silu(q).reshape(batch, length, heads, d_k))
        k = l2_normalize(nn.silu(k).reshape(batch, length, heads, d_k))
        return q, k, v.reshape(batch, length, heads, d_v), conv

    def delta_rule_output(self, x, q, k, v, state: FastWeightState, context: WindowContext, conv):
        """The gated delta rule over (q, k, v) from the fast weights in `state`, then the gated norm and the output
        projection: (output (B, n, d_model), the new cache)."""
        cfg = self.config.model
        batch, length, _ = x.shape
        heads, d_v = cfg.gdn_heads, cfg.gdn_head_dim_v
        projection = lambda features, name: dense(features, ("embed", "heads"), name, x.dtype)
        a_log = param(self, "A_log", _a_log_init, (heads,), (None,))
        dt_bias = param(self, "dt_bias", _dt_bias_init, (heads,), (None,))
        per_head = lambda name: dense(heads, ("embed", None), name, jnp.float32, hidden_matrix=False)  # tiny gates
        g = -jnp.exp(a_log) * jax.nn.softplus(per_head("a")(x).astype(jnp.float32) + dt_bias)
        beta = jax.nn.sigmoid(per_head("b")(x).astype(jnp.float32))
        real = context.valid[:, :, None]  # padding keeps S: no decay (g = 0), no write (beta = 0)
        g, beta = jnp.where(real, g, 0.0), jnp.where(real, beta, 0.0)

        out, fast_weights = gated_delta_rule(
            q, k, v, g, beta, state.S, implementation=cfg.gdn_implementation, chunk_size=cfg.gdn_chunk_size
        )
        gate = projection(heads * d_v, "gate")(x).reshape(batch, length, heads, d_v)
        out = GatedRMSNorm(cfg.norm_eps, name="out_norm")(out, gate).reshape(batch, length, heads * d_v)
        return dense(cfg.d_model, ("heads", "embed"), "o", x.dtype)(out), FastWeightState(fast_weights, conv)
