"""Causal softmax attention (RoPE, optional GQA) over the current window's KV slots, plus whatever else the eviction
mode shows a query (its `seen` hook: e.g. the previous window under "sliding", and sinks under "sinks:S").

Positions are window-relative: current slot j sits at position `offset + j` (the mode's offset, 0 when it shows
nothing else) and the mode's other keys at its own positions, so RoPE angles stay bounded however long the stream
runs. `attend` is that
attention given the projected q, k, v; the "attn" kind and the gated kind (`gated_attention.py`) share it.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from sleeplm.config import Config, Derived, ModelConfig
from sleeplm.eviction import Eviction
from sleeplm.model.mixer import Mixer, WindowContext, axes_like, write_slots
from sleeplm.model.params import dense
from sleeplm.model.rope import apply_rope
from sleeplm.parallel.axes import LogicalAxes


class AttentionCache(NamedTuple):
    """Keys/values of one attention layer, stored before RoPE (rotated at use with window-relative positions).

    `k`, `v`: (B, L, H_kv, d) slots for the current window. `kept`: what the eviction mode keeps across window ends
    (its `init_kept` / `keep` hooks; None under "hard"), e.g. the previous window's keys/values as its last sleep
    pass computed them. Sleep replays the whole current window against them, so they are kept beside the current
    window's slots rather than overwritten as in a ring buffer.
    """

    k: jax.Array
    v: jax.Array
    kept: Any


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
        return AttentionCache(slots(), slots(), config.sleep.eviction_mode.init_kept(slots))

    @classmethod
    def evict(cls, cache: AttentionCache, eviction: Eviction) -> AttentionCache:
        kept = eviction.keep(cache.k, cache.v, cache.kept)
        return AttentionCache(jnp.zeros_like(cache.k), jnp.zeros_like(cache.v), kept)

    @classmethod
    def cache_axes(cls, cache: AttentionCache) -> AttentionCache:
        slots = axes_like((cache.k, cache.v), "batch", None, "heads", None)
        kept = Eviction.kept_axes(cache.kept, LogicalAxes)
        return AttentionCache(*slots, kept)

    @classmethod
    def forward_flops_per_token(cls, config: Config) -> float:
        """q, k, v, o projections and the scores and weighted sum over the keys the eviction mode lets a query see."""
        m = config.model
        attended = config.sleep.eviction_mode.attended_keys(config.sleep.window)
        attn_width, kv_width = m.num_heads * m.head_dim, m.num_kv_heads * m.head_dim
        return 2 * m.d_model * (2 * attn_width + 2 * kv_width) + 4 * attended * attn_width

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
    KV slots after writing k, v (B, n, H_kv, d) into them (plus the keys the eviction mode's `seen` hook adds),
    RoPE on the first `rotary_dim` dims at window-relative positions. Returns (B, n, H d) and the new cache."""
    cfg = config.model
    batch, length, heads, head_dim = q.shape
    kv_heads, window = k.shape[2], cache.k.shape[1]
    write = lambda slots, values: write_slots(slots, values, context.pos, context.valid)
    cache_k, cache_v = write(cache.k, k), write(cache.v, v)

    query_slot = context.pos[:, None] + jnp.arange(length)  # (B, n)
    slot = jnp.arange(window)
    mask = slot <= query_slot[:, :, None]  # causal within the window, (B, n, L)
    keys, values, positions, offset = cache_k, cache_v, slot, 0
    seen = config.sleep.eviction_mode.seen(cache.kept, query_slot, context.prev_valid)
    if seen is not None:
        chex.assert_rank([seen.keys, seen.mask], [4, 3])
        keys = jnp.concatenate([seen.keys, cache_k], axis=1)
        values = jnp.concatenate([seen.values, cache_v], axis=1)
        mask = jnp.concatenate([seen.mask, mask], axis=2)
        positions, offset = jnp.concatenate([seen.positions, seen.offset + slot]), seen.offset
    q = apply_rope(q, offset + query_slot, cfg.rope_theta, cfg.rotary_dim)
    keys = apply_rope(keys, positions, cfg.rope_theta, cfg.rotary_dim)

    groups = heads // kv_heads
    q = q.reshape(batch, length, kv_heads, groups, head_dim)
    scores = jnp.einsum("bnkgd,bmkd->bkgnm", q, keys, preferred_element_type=jnp.float32)
    scores = jnp.where(mask[:, None, None], scores * head_dim**-0.5, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(scores, axis=-1).astype(values.dtype)
    out = jnp.einsum("bkgnm,bmkd->bnkgd", weights, values).reshape(batch, length, heads * head_dim)
    return out, cache._replace(k=cache_k, v=cache_v)
