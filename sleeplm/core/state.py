"""The state carried between wake/sleep calls (docs/method.md, "Windows, wake and sleep"), as a NamedTuple pytree.

Each layer's cache is its mixer kind's own type (`sleeplm.model.kinds`); every array in the state has the batch as
its leading dim, and each row is an independent stream with its own position in its own window. Sizes depend on
the batch and the window L, never on how many tokens have been seen.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from sleeplm.config import Config
from sleeplm.core.checks import check_config
from sleeplm.model.kinds import mixer_kind


class SleepState(NamedTuple):
    """Everything `wake_step` and `sleep_step` carry.

    `caches`: one cache per block, in block order. `sleep_input`: (B, capacity, d_model), the wake pass's output of
    the looped blocks (the last block unless `sleep.loop_layers` stops earlier) at each position of the current
    window: the input of sleep pass 2. `pos`: (B,) int32, tokens in each row's current window so far. `prev_valid`:
    (B,) bool, whether a row has ended (evicted) a window of its current document, so the eviction mode's kept
    keys/values hold something.
    """

    caches: tuple[Any, ...]
    sleep_input: jax.Array
    pos: jax.Array
    prev_valid: jax.Array

    @property
    def capacity(self) -> int:
        """Tokens a cache holds: the window L, or, without eviction, every token the stream will hold."""
        return self.sleep_input.shape[1]


def init_caches(config: Config, batch_size: int, capacity: int) -> tuple[Any, ...]:
    """Every block's empty cache of `capacity` tokens (every state and parameter starts here, so the
    config's registry names are checked here, `check_config`)."""
    check_config(config)
    return tuple(mixer_kind(kind).init_cache(config, batch_size, capacity) for kind in config.model.layers)


def state_capacity(config: Config, capacity: int | None) -> int:
    """Cache slots per row. Under an evicting mode, the window `sleep.window` (`capacity` must be None); the
    no-eviction mode ("none") keeps every token, so it needs the most tokens a row will hold, `capacity`."""
    if config.sleep.eviction_mode.bounded:
        if capacity is not None:
            raise ValueError(f"capacity={capacity!r} is invalid: only sleep.eviction='none' takes a capacity")
    elif not isinstance(capacity, int) or capacity < 1:
        raise ValueError(
            f"capacity={capacity!r} is invalid: sleep.eviction={config.sleep.eviction!r} keeps every token in one "
            "window, so a stream needs the most tokens it will hold (a positive integer)"
        )
    return config.sleep.eviction_mode.capacity(config.sleep.window, capacity)


def init_state(config: Config, batch_size: int, capacity: int | None = None) -> SleepState:
    """The state at the start of a sequence: no KV, zero fast weights, an empty first window of
    `state_capacity(config, capacity)` slots."""
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} is invalid: must be a positive integer")
    capacity = state_capacity(config, capacity)
    return SleepState(
        caches=init_caches(config, batch_size, capacity),
        sleep_input=jnp.zeros((batch_size, capacity, config.model.d_model), config.model.dtype),
        pos=jnp.zeros((batch_size,), jnp.int32),
        prev_valid=jnp.zeros((batch_size,), bool),
    )


def select_rows(rows: jax.Array, chosen: Any, other: Any) -> Any:
    """Row b of every array from `chosen` where rows[b], else from `other` (trees of the same structure)."""
    pick = lambda a, b: jnp.where(rows.reshape(-1, *(1,) * (a.ndim - 1)), a, b)
    return jax.tree.map(pick, chosen, other)


def evict(caches: tuple[Any, ...], prev_valid: jax.Array, rows: jax.Array, config: Config):
    """Ends the window of `rows` (B,) bool, as slept on: each block's kind says what its cache keeps under the
    eviction mode. Returns the new caches and `prev_valid` (True for `rows`: a window of the document has ended);
    other rows are unchanged."""
    mode = config.sleep.eviction_mode
    kinds = [mixer_kind(kind) for kind in config.model.layers]
    evicted = tuple(kind.evict(cache, mode) for kind, cache in zip(kinds, caches, strict=True))
    return select_rows(rows, evicted, caches), rows | prev_valid


def reset(caches: tuple[Any, ...], prev_valid: jax.Array, rows: jax.Array, capacity: int, config: Config):
    """Starts a new sequence in `rows` (B,) bool (a document start): their caches become those of an empty stream
    of `capacity` tokens, nothing is kept from a previous window. Returns the new caches and
    `prev_valid`."""
    apply = lambda caches: select_rows(rows, init_caches(config, prev_valid.shape[0], capacity), caches)
    caches = lax.cond(jnp.any(rows), apply, lambda caches: caches, caches)  # most windows start no document
    return caches, jnp.where(rows, False, prev_valid)
