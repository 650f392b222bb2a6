"""Attention sinks (StreamingLLM): "sinks:S" keeps the document's first S tokens beside a sliding window of width
L, so a query at document position q sees every p <= q with q - p < L or p < S, each once.

The sinks' keys/values are those of the document's first window as its last sleep pass computed them (as the
previous window's are under "sliding"). While that first window is itself the previous window, its first S slots
are seen from there; from the next window end on they are held apart. RoPE positions stay bounded: sinks at
0..S-1, the previous window at S..S+L-1, the current window from S+L.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from sleeplm.eviction.base import Eviction, Seen
from sleeplm.eviction.modes import previous_window_mask

DEFAULT_SINKS = 4


class SinksKept(NamedTuple):
    """`k`, `v`: the previous window (B, L, H_kv, d); `sink_k`, `sink_v`: the first S tokens (B, S, H_kv, d);
    `captured` (B,): the sinks have been taken; `apart` (B,): the sinks are no longer in the previous window."""

    k: jax.Array
    v: jax.Array
    sink_k: jax.Array
    sink_v: jax.Array
    captured: jax.Array
    apart: jax.Array


@dataclasses.dataclass(frozen=True)
class Sinks(Eviction):
    """Sliding-window attention of width L plus the document's first `sinks` tokens."""

    name: str = "sinks"
    sinks: int = DEFAULT_SINKS

    def with_argument(self, argument):
        try:
            sinks = int(argument)
        except ValueError:
            raise ValueError(f"the number of sink tokens must be an integer (got {argument!r})") from None
        return dataclasses.replace(self, sinks=sinks)

    def check(self, window):
        if not 0 <= self.sinks <= window:
            raise ValueError(f"keeps {self.sinks} sink tokens: must be between 0 and sleep.window={window}")

    def init_kept(self, slots):
        k, v = slots(), slots()
        flag = lambda: jnp.zeros(k.shape[:1], bool)
        return SinksKept(k, v, jnp.zeros_like(k[:, : self.sinks]), jnp.zeros_like(v[:, : self.sinks]), flag(), flag())

    def keep(self, k, v, kept):
        hold = lambda old, new: jnp.where(kept.captured[:, None, None, None], old, new[:, : self.sinks])
        return SinksKept(k, v, hold(kept.sink_k, k), hold(kept.sink_v, v), jnp.ones_like(kept.captured), kept.captured)

    def seen(self, kept, query_slot, prev_valid):
        window, sinks = kept.k.shape[1], self.sinks
        in_reach = previous_window_mask(query_slot, window, prev_valid)
        first = (jnp.arange(window) < sinks) & (prev_valid & ~kept.apart)[:, None, None]  # sinks still in there
        sink_mask = jnp.broadcast_to(kept.apart[:, None, None], (*query_slot.shape, sinks))
        return Seen(
            jnp.concatenate([kept.sink_k, kept.k], axis=1),
            jnp.concatenate([kept.sink_v, kept.v], axis=1),
            jnp.concatenate([sink_mask, in_reach | first], axis=2),
            jnp.arange(sinks + window),
            sinks + window,
        )

    def attended_keys(self, window):
        return 2 * window + self.sinks
