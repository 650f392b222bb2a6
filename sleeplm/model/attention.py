"""Causal softmax attention (RoPE, optional GQA) over the current window's KV slots, plus, under an eviction mode
that keeps the previous window, that window's KV: every query then sees exactly the last L positions still held.

Positions are window-relative: current slot j sits at position `offset + j` (offset = L when a previous window is
kept, else 0) and previous slot j at j, so RoPE angles stay bounded however long the stream runs.
"""

from __future__ import annotations

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from sleeplm.config import Config, ModelConfig
from sleeplm.eviction import Eviction
from sleeplm.model.mixer import Mixer, WindowContext, axes_like, write_slots
from sleeplm.model.params import dense
from sleeplm.model.rope import apply_rope


class AttentionCache(NamedTuple):
    """Keys/values of one attention layer, stored before RoPE (rotated at use with window-relative positions).

    `k`, `v`: (B, L, H_kv, d) slots for the current window. `prev_k`, `prev_v`: the previous window's keys/values
    as computed by its last sleep pass (modes that keep the previous window, else None). Sleep replays the whole
    current window against them, so they are kept beside the current window's slots rather than overwritten as in a
    ring buffer.
    """

    k: jax.Array
    v: jax.Array
    prev_k: jax.Array | None
    prev_v: jax.Array | None


class Attention(Mixer):
    @classmethod
    def check_config(cls, model: ModelConfig) -> None:
        if model.head_dim % 2:
            raise ValueError(f"head_dim={model.head_dim!r} is invalid: must be even (RoPE rotates pairs of dims)")
        if model.num_heads % model.num_kv_heads:
            raise ValueError(f"num_kv_heads={model.num_kv_heads!r} is invalid: must divide num_heads={model.num_heads}")

    @classmethod
    def init_cache(cls, config: Config, batch: int, window: int) -> AttentionCache:
        model = config.model
        slots = lambda: jnp.zeros((batch, window, model.num_kv_heads, model.head_dim), model.dtype)
        previous = (slots(), slots()) if config.sleep.eviction_mode.keeps_previous_window else (None, None)
        return AttentionCache(slots(), slots(), *previous)

    @classmethod
    def evict(cls, cache: AttentionCache, eviction: Eviction) -> AttentionCache:
        previous = (cache.k, cache.v) if eviction.keeps_previous_window else (None, None)
        return AttentionCache(jnp.zeros_like(cache.k), jnp.zeros_like(cache.v), *previous)

    @classmethod
    def cache_axes(cls, cache: AttentionCache) -> AttentionCache:
        return axes_like(cache, "batch", None, "heads", None)

    @classmethod
    def split_sizes(cls, model: ModelConfig) -> dict[str, dict[str, int]]:
        return {"heads": {"model.num_heads": model.num_heads, "model.num_kv_heads": model.num_kv_heads}}

    @nn.compact
    def __call__(self, x: jax.Array, cache: AttentionCache, context: WindowContext) -> tuple[jax.Array, AttentionCache]:
        """x: (B, n, d) for window positions pos .. pos + n - 1. Writes their K/V into the cache slots."""
        cfg = self.config.model
        batch, length, _ = x.shape
        window = cache.k.shape[1]
        heads, kv_heads, head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        projection = lambda features, name: dense(features, ("embed", "heads"), name, x.dtype)
        q = projection(heads * head_dim, "q")(x).reshape(batch, length, heads, head_dim)
        k = projection(kv_heads * head_dim, "k")(x).reshape(batch, length, kv_heads, head_dim)
        v = projection(kv_heads * head_dim, "v")(x).reshape(batch, length, kv_heads, head_dim)
        write = lambda slots, values: write_slots(slots, values, context.pos, context.valid)
        cache_k, cache_v = write(cache.k, k), write(cache.v, v)

        query_slot = context.pos[:, None] + jnp.arange(length)  # (B, n)
        slot = jnp.arange(window)
        mask = slot <= query_slot[:, :, None]  # causal within the window, (B, n, L)
        keys, values, offset = cache_k, cache_v, 0
        if self.config.sleep.eviction_mode.keeps_previous_window:  # previous slot j is in reach of query i iff j > i
            keys = jnp.concatenate([cache.prev_k, cache_k], axis=1)
            values = jnp.concatenate([cache.prev_v, cache_v], axis=1)
            prev_mask = (slot > query_slot[:, :, None]) & context.prev_valid[:, None, None]
            mask = jnp.concatenate([prev_mask, mask], axis=2)
            offset = window
        q = apply_rope(q, offset + query_slot, cfg.rope_theta)
        keys = apply_rope(keys, jnp.arange(keys.shape[1]), cfg.rope_theta)

        groups = heads // kv_heads
        q = q.reshape(batch, length, kv_heads, groups, head_dim)
        scores = jnp.einsum("bnkgd,bmkd->bkgnm", q, keys, preferred_element_type=jnp.float32)
        scores = jnp.where(mask[:, None, None], scores * head_dim**-0.5, jnp.finfo(jnp.float32).min)
        weights = jax.nn.softmax(scores, axis=-1).astype(values.dtype)
        out = jnp.einsum("bkgnm,bmkd->bnkgd", weights, values).reshape(batch, length, heads * head_dim)
        output = dense(cfg.d_model, ("heads", "embed"), "o", x.dtype)(out)
        return output, cache._replace(k=cache_k, v=cache_v)
