"""The contract of a mixer kind: the token-mixing layer of a block (attention, Gated DeltaNet, or a user's own).

A kind is one `Mixer` subclass in one module, registered under a name in `sleeplm.model.kinds`. It owns:
- its parameters (created with `sleeplm.model.params`, so each carries its logical axes and optimiser role);
- its cache, a NamedTuple pytree of fixed size for a window of L tokens (`init_cache`);
- what the end of a slept window does to that cache under an eviction mode (`evict`);
- the logical axes of its cache's arrays (`cache_axes`), from which the sleep state is sharded;
- the model fields that sharding splits over a logical axis (`split_sizes`), so a mesh that cannot divide them fails
  at setup naming the field;
- its cost: FLOPs of one pass for one token (`forward_flops_per_token`), which the FLOP count sums;
- its config checks (`check_config`), run when a `ModelConfig` lists the kind;
- optionally, how to make it add nothing to the residual stream (`silence`), so a retrofit can insert it into a
  trained model without changing the model's function.
The block stack, `init_state`, `evict`, the sharding rules and the optimizer ask the kind; none switches on its name.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from sleeplm.config import Config, ModelConfig
from sleeplm.eviction import Eviction
from sleeplm.parallel.axes import LogicalAxes


class WindowContext(NamedTuple):
    """Where a call sits in its window, per row (rows are independent streams):

    `pos` (B,) int32: the window position of the call's first token; `prev_valid` (B,) bool: whether a window of
    the row's document has ended (so what the eviction mode keeps holds something); `valid` (B, n) bool: which of
    the call's n tokens are real. Valid tokens form a prefix of each row's call; the others (padding) change no
    cache and their outputs are unused.
    """

    pos: jax.Array
    prev_valid: jax.Array
    valid: jax.Array


def window_start(batch: int, length: int, prev_valid: jax.Array | None = None) -> WindowContext:
    """The context of a whole window's worth of valid tokens at the start of a window."""
    prev_valid = jnp.zeros((batch,), bool) if prev_valid is None else prev_valid
    return WindowContext(jnp.zeros((batch,), jnp.int32), prev_valid, jnp.ones((batch, length), bool))


def write_slots(slots: jax.Array, values: jax.Array, start: jax.Array, valid: jax.Array) -> jax.Array:
    """Writes each row's valid values (B, n, ...) into its slots (B, L, ...) from position start (B,) on; every
    other slot keeps its content (no clamping at the end: values that would land past the last slot are dropped)."""
    window, length = slots.shape[1], values.shape[1]
    if length < window:  # fewer values than slots (decoding, a chunk into a long buffer): a scatter touches only n
        index = jnp.where(valid, start[:, None] + jnp.arange(length), window)  # padding and overflow: dropped
        return slots.at[jnp.arange(slots.shape[0])[:, None], index].set(values.astype(slots.dtype), mode="drop")
    offset = jnp.arange(window)[None, :] - start[:, None]  # (B, L): the value that lands in each slot
    index = jnp.clip(offset, 0, length - 1)
    written = (offset >= 0) & (offset < length) & jnp.take_along_axis(valid, index, axis=1)
    trailing = (1,) * (values.ndim - 2)
    gathered = jnp.take_along_axis(values, index.reshape(*index.shape, *trailing), axis=1).astype(slots.dtype)
    return jnp.where(written.reshape(*written.shape, *trailing), gathered, slots)


class Mixer(nn.Module):
    """A mixer kind. Instances are called on the normed hidden states of window positions pos .. pos + n - 1."""

    config: Config

    def __call__(self, x: jax.Array, cache: Any, context: WindowContext) -> tuple[jax.Array, Any]:
        """x (B, n, d_model) -> (output (B, n, d_model), the cache after these tokens)."""
        raise NotImplementedError

    @classmethod
    def check_config(cls, model: ModelConfig) -> None:
        """Raises ValueError naming a field of `model` this kind cannot work with."""

    @classmethod
    def init_cache(cls, config: Config, batch: int, capacity: int) -> Any:
        """The empty cache for `batch` rows of `capacity` tokens each (the window L, or every token of a stream
        without eviction). Each leaf is a fresh buffer: states are donated, and one buffer may not be donated twice."""
        raise NotImplementedError

    @classmethod
    def evict(cls, cache: Any, eviction: Eviction) -> Any:
        """The cache after a window has ended (been slept on) under `eviction`."""
        raise NotImplementedError

    @classmethod
    def cache_axes(cls, cache: Any) -> Any:
        """`cache`'s structure with each array replaced by its logical axes."""
        raise NotImplementedError

    @classmethod
    def forward_flops_per_token(cls, config: Config) -> float:
        """FLOPs of one pass of this mixer for one token (2 per multiply-add; matmuls and the token-mixing rule,
        not norms or elementwise gates): `sleeplm.training.flops` sums them over the blocks."""
        raise NotImplementedError(f"mixer kind {cls.__name__} does not report its FLOPs")

    @classmethod
    def split_sizes(cls, model: ModelConfig) -> dict[str, dict[str, int]]:
        """{logical axis: {"model.FIELD": size}} for the sizes this kind's parameters and cache split over it."""
        return {}

    @classmethod
    def silence(cls, params: dict) -> dict:
        """This kind's parameters (one block's) changed so that its output is zero whatever its input (e.g. a zero
        output projection), the others kept: a retrofit inserts the kind this way."""
        raise NotImplementedError(f"mixer kind {cls.__name__} cannot be inserted by a retrofit: it defines no silence")


def axes_like(tree: Any, *axes: str | None) -> Any:
    """`tree` with every array replaced by the logical axes `axes` (None leaves stay None)."""
    return jax.tree.map(lambda _: LogicalAxes(axes), tree)
