"""Causal softmax attention (RoPE, optional GQA) over the current window's KV slots, plus, under an eviction mode
that keeps the previous window, that window's KV: every query then sees exactly the last L positions still held.

Positions are window-relative: current slot j sits at position `offset + j` (offset = L when a previous window is
kept, else 0) and previous slot j at j, so RoPE angles stay bounded however long the stream runs. `attend` is that
attention given the projected q, k, v; the "attn" kind and the gated kind (`gated_attention.py`) share it.
"""

from __future__ import annotations

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from sleeplm.config import Config, Derived, ModelConfig
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
        if isinstance(model.rotary_dim, Derived) and model.rotary_dim % 2:  # RoPE on all of head_dim
            origin = " (d_model // num_heads)" if isinstance(model.head_dim, Derived) else ""
            raise ValueError(
                f"head_dim={model.head_dim!r}{origin} is invalid for attention: must be even (RoPE rotates pairs of "
                "dims), or set rotary_dim"
            )
        if model.rotary_dim % 2 or model.rotary_dim > model.head_dim:
            raise ValueError(
                f"rotary_dim={model.rotary_dim!r} is invalid: must be even and at most head_dim={model.head_dim}"
            )
        if model.num_heads % model.num_kv_heads:
            raise ValueError(f"num_kv_heads={model.num_kv_heads!r} is invalid: must divide num_heads={model.num_heads}")

    @classmethod
    def init_cache(cls, config: Config, batch: int, capacity: int) -> AttentionCache:
        model = config.model
        slots = lambda: jnp.zeros((batch, capacity, model.num_kv_heads, model.head_dim), model.dtype)
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
        out, cache = attend(*self.queries_keys_values(x), cache, context, self.config)
        return dense(self.config.model.d_model, ("heads", "embed"), "o", x.dtype)(out), cache

    def queries_keys_values(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """The projections q (B, n, H, d), k and v (B, n, H_kv, d)."""
        cfg = self.config.model
        batch, length, _ = x.shape
        project = lambda heads, name: dense(heads * cfg.head_dim, ("embed", "heads"), name, x.dtype)(x).reshape(
            batch, length, heads, cfg.head_dim
        )
        return project(cfg.num_heads, "q"), project(cfg.num_kv_heads, "k"), project(cfg.num_kv_heads, "v")


def attend(
    q: jax.Array, k: jax.Array, v: jax.Array, cache: AttentionCache, context: WindowContext, config: Config
) -> tuple[jax.Array, AttentionCache]:
    """Causal softmax attention of queries q (B, n, H, d) at window positions pos .. pos + n - 1 over the window's
    KV slots after writing k, v (B, n, H_kv, d) into them (plus the previous window's, under a mode that keeps it),
    RoPE on the first `rotary_dim` dims at window-relative positions. Returns (B, n, H d) and the new cache."""
    cfg = config.model
    batch, length, heads, head_dim = q.shape
    kv_heads, window = k.shape[2], cache.k.shape[1]
    write = lambda slots, values: write_slots(slots, values, context.pos, context.valid)
    cache_k, cache_v = write(cache.k, k), write(cache.v, v)

    query_slot = context.pos[:, None] + jnp.arange(length)  # (B, n)
    slot = jnp.arange(window)
    mask = slot <= query_slot[:, :, None]  # causal within the window, (B, n, L)
    keys, values, offset = cache_k, cache_v, 0
    if config.sleep.eviction_mode.keeps_previous_window:  # previous slot j is in reach of query i iff j > i
        keys = jnp.concatenate([cache.prev_k, cache_k], axis=1)
        values = jnp.concatenate([cache.prev_v, cache_v], axis=1)
        prev_mask = (slot > query_slot[:, :, None]) & context.prev_valid[:, None, None]
        mask = jnp.concatenate([prev_mask, mask], axis=2)
        offset = window
    q = apply_rope(q, offset + query_slot, cfg.rope_theta, cfg.rotary_dim)
    keys = apply_rope(keys, jnp.arange(keys.shape[1]), cfg.rope_theta, cfg.rotary_dim)

    groups = heads // kv_heads
    q = q.reshape(batch, length, kv_heads, groups, head_dim)
    scores = jnp.einsum("bnkgd,bmkd->bkgnm", q, keys, preferred_element_type=jnp.float32)
    scores = jnp.where(mask[:, None, None], scores * head_dim**-0.5, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(scores, axis=-1).astype(values.dtype)
    out = jnp.einsum("bkgnm,bmkd->bnkgd", weights, values).reshape(batch, length, heads * head_dim)
    return out, cache._replace(k=cache_k, v=cache_v)
