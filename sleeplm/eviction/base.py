"""The contract of an eviction mode: what attention keeps of its keys and values when a window ends, and what else
a query sees besides the current window's slots (docs/method.md, "Eviction").

Attention (`model/attention.py`) calls the hooks; it never reads a mode's name. What a mode keeps is its "kept"
pytree, stored in each attention layer's cache: arrays whose leading dim is the batch, (B, M, H_kv, d) for keys and
values and (B,) for flags, so `kept_axes` can name their logical axes without knowing the mode.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax


class Seen(NamedTuple):
    """The keys/values a query sees besides the current window's slots, placed before them.

    `keys`, `values`: (B, M, H_kv, d), stored before RoPE. `mask`: (B, n, M) bool, which of them each of the n
    queries sees. `positions`: (M,) int, their RoPE positions. `offset`: the RoPE position of current slot 0 (each
    current slot j, and a query at window position j, sits at offset + j)."""

    keys: jax.Array
    values: jax.Array
    mask: jax.Array
    positions: jax.Array
    offset: int


@dataclasses.dataclass(frozen=True)
class Eviction:
    """An eviction mode; a subclass with behaviour of its own overrides the hooks. Frozen and hashable: it is part of
    the static config.

    `bounded`: a window of L tokens is slept on and evicted when full and followed by more of its document; when
    False nothing is slept on or evicted, and the caches hold every token of the document (full causal attention:
    `forward` still steps through windows of L, but into caches as long as the sequence). The defaults keep nothing
    across a window's end and show a query only its own window's slots."""

    name: str
    bounded: bool = True

    def with_argument(self, argument: str) -> Eviction:
        """The mode `name:argument` names (e.g. "sinks:4"); a mode without an argument refuses one."""
        raise ValueError(f"takes no argument (got {argument!r})")

    def check(self, window: int) -> None:
        """Raises ValueError (without the field name) when this mode cannot work with windows of `window` tokens."""

    def capacity(self, window: int, requested: int | None) -> int:
        """Cache slots per row: the configured window L, or, without eviction, the most tokens a row will hold."""
        return window if self.bounded else requested

    def init_kept(self, slots: Callable[[], jax.Array]) -> Any:
        """What attention holds besides the current window at the start of a document (empty); `slots()` makes a
        fresh zero (B, capacity, H_kv, d) buffer (each leaf must be its own buffer: states are donated)."""
        return None

    def keep(self, k: jax.Array, v: jax.Array, kept: Any) -> Any:
        """What attention keeps when a window ends (after its last sleep pass), given that window's keys and values
        k, v (B, L, H_kv, d) and what it kept before; the window's own slots are then cleared."""
        return kept

    def seen(self, kept: Any, query_slot: jax.Array, prev_valid: jax.Array) -> Seen | None:
        """The keys/values that queries at window positions `query_slot` (B, n) see besides the current window's
        slots (which they see causally), or None. `prev_valid` (B,): whether the row has ended a window of its
        current document (so `kept` holds something)."""
        return None

    def attended_keys(self, window: int) -> int:
        """Keys one query's scores are counted over, for the FLOP count (also without eviction: one window)."""
        return window

    @staticmethod
    def kept_axes(kept: Any, wrap: Callable[[tuple], Any] = tuple) -> Any:
        """`kept` with each array replaced by `wrap` of its logical axes: (batch, -, heads, -) for keys/values
        (B, M, H_kv, d), (batch, ...) for flags. The same for every mode (the cache's axes are asked of the kind,
        which does not know the mode), so a mode's kept arrays follow these shapes."""
        names = lambda a: ("batch", None, "heads", None) if a.ndim == 4 else ("batch",) + (None,) * (a.ndim - 1)
        return jax.tree.map(lambda a: wrap(names(a)), kept)
