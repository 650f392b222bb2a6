"""The state carried between wake/sleep calls (docs/method.md, "Windows, wake and sleep"), as a NamedTuple pytree.

Each layer's cache is its mixer kind's own type (`sleeplm.model.kinds`); sizes depend on the batch and the window L,
never on how many tokens have been seen.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from sleeplm.config import Config
from sleeplm.model.kinds import mixer_kind


class SleepState(NamedTuple):
    """Everything `wake_step` and `sleep_step` carry.

    `layers`: one cache per block, in layer order. `hidden`: (B, L, d_model), the last block's output of the wake
    pass at each position of the current window (the input of sleep pass 2). `pos`: int32 scalar, tokens in the
    current window so far. `prev_valid`: bool scalar, whether a previous window's KV is kept (modes that keep it).
    """

    layers: tuple[Any, ...]
    hidden: jax.Array
    pos: jax.Array
    prev_valid: jax.Array


def init_caches(config: Config, batch_size: int, window: int) -> tuple[Any, ...]:
    """Every block's empty cache for windows of `window` tokens."""
    return tuple(mixer_kind(kind).init_cache(config, batch_size, window) for kind in config.model.layers)


def init_state(config: Config, batch_size: int) -> SleepState:
    """The state at the start of a sequence: no KV, zero fast weights, an empty first window."""
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} is invalid: must be a positive integer")
    if not config.sleep.eviction_mode.bounded:
        raise ValueError(
            f"sleep.eviction={config.sleep.eviction!r} (the no-eviction baseline) has no streaming state: use `forward`"
        )
    window = config.sleep.window
    return SleepState(
        layers=init_caches(config, batch_size, window),
        hidden=jnp.zeros((batch_size, window, config.model.d_model), config.model.dtype),
        pos=jnp.zeros((), jnp.int32),
        prev_valid=jnp.zeros((), bool),
    )


def evict(layers: tuple[Any, ...], config: Config) -> tuple[tuple[Any, ...], jax.Array]:
    """Ends a slept window: each block's kind says what its cache keeps under the eviction mode.

    Returns the new caches and the new `prev_valid`.
    """
    mode = config.sleep.eviction_mode
    evicted = tuple(
        mixer_kind(kind).evict(cache, mode) for kind, cache in zip(config.model.layers, layers, strict=True)
    )
    return evicted, jnp.asarray(mode.keeps_previous_window)
