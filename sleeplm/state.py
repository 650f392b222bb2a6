"""The state carried between wake/sleep calls (SPEC §3), as typed NamedTuples (pytrees).

Sizes depend on the batch and the window L, never on how many tokens have been seen.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from sleeplm.config import Config


class AttentionCache(NamedTuple):
    """Keys/values of one attention layer, stored before RoPE (rotated at use with window-relative positions).

    `k`, `v`: (B, L, H_kv, d) slots for the current window. `prev_k`, `prev_v`: the previous window's keys/values
    as computed by its last sleep pass ("sliding" eviction only, else None). Sleep replays the whole current window
    against them, so they are kept beside the current window's slots rather than overwritten as in a ring buffer.
    """

    k: jax.Array
    v: jax.Array
    prev_k: jax.Array | None
    prev_v: jax.Array | None


class FastWeightState(NamedTuple):
    """One Gated DeltaNet layer: `S` (B, H, d_k, d_v) float32, and the short convolution's last inputs of the
    current window, `conv` (B, width - 1, channels) (None without short convolution)."""

    S: jax.Array
    conv: jax.Array | None


LayerState = AttentionCache | FastWeightState


class SleepState(NamedTuple):
    """Everything `wake_step` and `sleep_step` carry.

    `layers`: one cache per block, in layer order. `hidden`: (B, L, d_model), the last block's output of the wake
    pass at each position of the current window (the input of sleep pass 2). `pos`: int32 scalar, tokens in the
    current window so far. `prev_valid`: bool scalar, whether a previous window's KV is kept ("sliding").
    """

    layers: tuple[LayerState, ...]
    hidden: jax.Array
    pos: jax.Array
    prev_valid: jax.Array


def activation_dtype(config: Config) -> jnp.dtype:
    return jnp.dtype(config.model.dtype)


def init_layer_states(config: Config, batch_size: int) -> tuple[LayerState, ...]:
    """Empty per-layer caches: zero KV slots, zero fast weights."""
    model, window = config.model, config.sleep.window
    dtype = activation_dtype(config)
    sliding = config.sleep.eviction == "sliding"
    states: list[LayerState] = []
    for kind in model.layers:
        if kind == "attn":
            slots = functools.partial(jnp.zeros, (batch_size, window, model.kv_heads, model.attn_head_dim), dtype)
            # Each call makes a distinct buffer: the state is donated, and one buffer may not be donated twice.
            states.append(AttentionCache(slots(), slots(), *((slots(), slots()) if sliding else (None, None))))
        else:
            heads, d_k, d_v = model.gdn_num_heads, model.gdn_dim_k, model.gdn_dim_v
            channels = heads * (2 * d_k + d_v)
            conv = jnp.zeros((batch_size, model.conv_width - 1, channels), dtype) if model.short_conv else None
            states.append(FastWeightState(jnp.zeros((batch_size, heads, d_k, d_v), jnp.float32), conv))
    return tuple(states)


def init_state(config: Config, batch_size: int) -> SleepState:
    """The state at the start of a sequence: no KV, zero fast weights, an empty first window."""
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} is invalid: must be a positive integer")
    if config.sleep.eviction == "none":
        raise ValueError("sleep.eviction='none' (the no-eviction baseline) has no streaming state: use `forward`")
    return SleepState(
        layers=init_layer_states(config, batch_size),
        hidden=jnp.zeros((batch_size, config.sleep.window, config.model.d_model), activation_dtype(config)),
        pos=jnp.zeros((), jnp.int32),
        prev_valid=jnp.zeros((), bool),
    )


def evict(layers: tuple[LayerState, ...], config: Config) -> tuple[tuple[LayerState, ...], jax.Array]:
    """Ends a slept window: per the eviction mode, clears (hard) or keeps as previous (sliding) the KV;
    the short-convolution inputs are cleared (never carried across windows); S survives.

    Returns the new layer states and the new `prev_valid`.
    """
    sliding = config.sleep.eviction == "sliding"
    evicted: list[LayerState] = []
    for layer in layers:
        if isinstance(layer, AttentionCache):
            prev_k, prev_v = (layer.k, layer.v) if sliding else (None, None)
            evicted.append(AttentionCache(jnp.zeros_like(layer.k), jnp.zeros_like(layer.v), prev_k, prev_v))
        else:
            evicted.append(layer._replace(conv=None if layer.conv is None else jnp.zeros_like(layer.conv)))
    return tuple(evicted), jnp.asarray(sliding)
