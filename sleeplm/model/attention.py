"""Causal softmax attention (RoPE, optional GQA) over the current window's KV slots, plus, under "sliding"
eviction, the previous window's kept KV: every query sees exactly the last L positions that are still held.

Positions are window-relative: current slot j sits at position `offset + j` (offset = L when a previous window
is held, else 0) and previous slot j at j, so RoPE angles stay bounded however long the stream runs.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from sleeplm.config import ModelConfig
from sleeplm.model.rope import apply_rope
from sleeplm.state import AttentionCache


class Attention(nn.Module):
    config: ModelConfig
    window: int

    @nn.compact
    def __call__(
        self, x: jax.Array, cache: AttentionCache, pos: jax.Array, prev_valid: jax.Array
    ) -> tuple[jax.Array, AttentionCache]:
        """x: (B, n, d) for window positions pos .. pos + n - 1. Writes their K/V into the cache slots."""
        cfg, window = self.config, self.window
        batch, length, _ = x.shape
        heads, kv_heads, head_dim = cfg.num_heads, cfg.kv_heads, cfg.attn_head_dim
        dense = lambda features, name: nn.Dense(features, use_bias=False, dtype=x.dtype, name=name)
        q = dense(heads * head_dim, "q")(x).reshape(batch, length, heads, head_dim)
        k = dense(kv_heads * head_dim, "k")(x).reshape(batch, length, kv_heads, head_dim)
        v = dense(kv_heads * head_dim, "v")(x).reshape(batch, length, kv_heads, head_dim)
        cache_k = lax.dynamic_update_slice(cache.k, k.astype(cache.k.dtype), (0, pos, 0, 0))
        cache_v = lax.dynamic_update_slice(cache.v, v.astype(cache.v.dtype), (0, pos, 0, 0))

        query_slot = pos + jnp.arange(length)  # (n,)
        slot = jnp.arange(window)
        mask = slot[None, :] <= query_slot[:, None]  # causal within the window, (n, L)
        keys, values, offset = cache_k, cache_v, 0
        if cache.prev_k is not None:  # sliding: previous slot j is within reach of query i iff j > i
            keys = jnp.concatenate([cache.prev_k, cache_k], axis=1)
            values = jnp.concatenate([cache.prev_v, cache_v], axis=1)
            prev_mask = (slot[None, :] > query_slot[:, None]) & prev_valid
            mask = jnp.concatenate([prev_mask, mask], axis=1)
            offset = window
        q = apply_rope(q, offset + query_slot, cfg.rope_theta)
        keys = apply_rope(keys, jnp.arange(keys.shape[1]), cfg.rope_theta)

        groups = heads // kv_heads
        q = q.reshape(batch, length, kv_heads, groups, head_dim)
        scores = jnp.einsum("bnkgd,bmkd->bkgnm", q, keys, preferred_element_type=jnp.float32)
        scores = jnp.where(mask, scores * head_dim**-0.5, jnp.finfo(jnp.float32).min)
        weights = jax.nn.softmax(scores, axis=-1).astype(values.dtype)
        out = jnp.einsum("bkgnm,bmkd->bnkgd", weights, values).reshape(batch, length, heads * head_dim)
        return dense(cfg.d_model, "o")(out), cache._replace(k=cache_k, v=cache_v)
