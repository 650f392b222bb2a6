"""The built-in modes without attention sinks: "hard" (a window's KV is cleared when it ends), "sliding" (the ended
window is kept beside the current one: sliding-window attention of width L) and "none" (no eviction)."""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from sleeplm.eviction.base import Eviction, Seen


@dataclasses.dataclass(frozen=True)
class Hard(Eviction):
    """Every window's KV is cleared as it ends: a query sees its own window only."""

    name: str = "hard"


@dataclasses.dataclass(frozen=True)
class NoEviction(Eviction):
    """Nothing is slept on or evicted: the caches hold the whole document (full causal attention)."""

    name: str = "none"
    bounded: bool = False


class Previous(NamedTuple):
    """The previous window's keys and values (B, L, H_kv, d) as its last sleep pass computed them."""

    k: jax.Array
    v: jax.Array


def previous_window_mask(query_slot: jax.Array, window: int, prev_valid: jax.Array) -> jax.Array:
    """(B, n, L): previous slot j is in reach of a query at window position i iff j > i (the last L positions)."""
    slot = jnp.arange(window)
    return (slot > query_slot[:, :, None]) & prev_valid[:, None, None]


@dataclasses.dataclass(frozen=True)
class Sliding(Eviction):
    """The ended window's KV is kept beside the current window's: every query sees the last L positions. RoPE
    positions: previous slot j at j, current slot j at L + j (bounded however long the stream runs)."""

    name: str = "sliding"

    def init_kept(self, slots):
        return Previous(slots(), slots())

    def keep(self, k, v, kept):
        return Previous(k, v)

    def seen(self, kept, query_slot, prev_valid):
        window = kept.k.shape[1]
        mask = previous_window_mask(query_slot, window, prev_valid)
        return Seen(kept.k, kept.v, mask, jnp.arange(window), window)

    def attended_keys(self, window):
        return 2 * window
