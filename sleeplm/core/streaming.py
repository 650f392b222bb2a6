"""The streaming path over an explicit `SleepState` (docs/method.md, "Windows, wake and sleep"): `wake_step` feeds
tokens, `sleep_step` consolidates full windows; `consume` and `sleep_rows` are the traceable pieces that generation
and scoring run inside their own jitted loops."""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
from jax import lax

from sleeplm.config import Config
from sleeplm.core.checks import check_masks, check_tokens
from sleeplm.core.parameters import Params
from sleeplm.core.passes import embed, logits_of, sleep_passes, wake_pass
from sleeplm.core.state import SleepState, evict, select_rows
from sleeplm.model.mixer import WindowContext, write_slots


def at_last_token(values: jax.Array, count: jax.Array) -> jax.Array:
    """values[b, count[b] - 1] of (B, n, ...) values: each row's last fed token (row b's first when count is 0)."""
    index = jnp.maximum(count - 1, 0).reshape(-1, 1, *(1,) * (values.ndim - 2))
    return jnp.take_along_axis(values, index, axis=1)[:, 0]


def sleep_rows(params: Params, state: SleepState, rows: jax.Array, config: Config) -> SleepState:
    """Passes 2..N and eviction for `rows` (B,) bool, whose windows are full; other rows unchanged."""

    def consolidate(state: SleepState) -> SleepState:
        slept = sleep_passes(params, state.sleep_input, state.caches, state.prev_valid, config)
        caches, prev_valid = evict(select_rows(rows, slept, state.caches), state.prev_valid, rows, config)
        return SleepState(caches, state.sleep_input, jnp.where(rows, 0, state.pos), prev_valid)

    return lax.cond(jnp.any(rows), consolidate, lambda s: s, state)


def full_rows(state: SleepState, config: Config) -> jax.Array:
    """Rows whose window is full and can be slept on (never under the no-eviction mode)."""
    return (state.pos == state.capacity) & config.sleep.eviction_mode.bounded


def consume(
    params: Params, state: SleepState, tokens: jax.Array, valid: jax.Array, config: Config
) -> tuple[jax.Array, SleepState]:
    """Feeds each row's valid tokens (a prefix of its n) into its stream; returns the last block's hidden states
    (B, n, d) and the new state. Traceable (used inside jitted callers).

    Rows advance independently: each step takes, per row, as many of its remaining tokens as fit in its current
    window (at most min(n, L)), after sleeping on the windows that are full while tokens remain. Under the
    no-eviction mode tokens beyond the stream's capacity are not consumed and their hidden states are NaN.
    """
    batch, length = tokens.shape
    chunk = min(length, config.sleep.window)  # also without eviction: attention scores stay (L, capacity) per step
    embedded = embed(params, tokens, config)
    total = jnp.sum(valid, axis=1, dtype=jnp.int32)
    out = jnp.full((batch, length, config.model.d_model), jnp.nan, embedded.dtype)

    def pending(carry):
        state, consumed, _ = carry
        return jnp.any((consumed < total) & ((state.pos < state.capacity) | full_rows(state, config)))

    def step(carry):
        state, consumed, out = carry
        state = sleep_rows(params, state, full_rows(state, config) & (consumed < total), config)
        take = jnp.minimum(total - consumed, jnp.minimum(state.capacity - state.pos, chunk))
        index = jnp.clip(consumed[:, None] + jnp.arange(chunk), 0, length - 1)
        x = jnp.take_along_axis(embedded, index[:, :, None], axis=1)
        context = WindowContext(state.pos, state.prev_valid, jnp.arange(chunk) < take[:, None])
        h, looped, caches = wake_pass(params, x, state.caches, context, config)
        sleep_input = write_slots(state.sleep_input, looped, state.pos, context.valid)
        out = write_slots(out, h, consumed, context.valid)
        return SleepState(caches, sleep_input, state.pos + take, state.prev_valid), consumed + take, out

    state, _, out = lax.while_loop(pending, step, (state, jnp.zeros((batch,), jnp.int32), out))
    return out, state


def read(
    params: Params, state: SleepState, logits: jax.Array, tokens: jax.Array, valid: jax.Array, config: Config
) -> tuple[SleepState, jax.Array, jax.Array]:
    """`consume` for scoring: feeds each row's valid tokens (a prefix of its n) after `logits` (B, vocab), the
    prediction of the row's next token. Returns the new state, the prediction after each row's last valid token
    (its old one for a row with none) and `predictions` (B, n, vocab): the logits each token was predicted by.
    Traceable."""
    hidden, state = consume(params, state, tokens, valid, config)
    after = logits_of(params, hidden, config)
    predictions = jnp.concatenate([logits[:, None], after[:, :-1]], axis=1)
    count = jnp.sum(valid, axis=1, dtype=jnp.int32)
    return state, jnp.where(count[:, None] > 0, at_last_token(after, count), logits), predictions


def token_log_likelihoods(predictions: jax.Array, tokens: jax.Array) -> jax.Array:
    """log softmax(predictions)[token] (B, n) of each token under the logits (B, n, vocab) that predicted it."""
    return jnp.take_along_axis(jax.nn.log_softmax(predictions), tokens[..., None], axis=-1)[..., 0]


@functools.partial(jax.jit, static_argnames=("config",), donate_argnames=("state",))
def sleep_step(params: Params, state: SleepState, config: Config) -> SleepState:
    """Sleeps on every row whose window is full: N - 1 passes from the wake pass's hidden states, then eviction.

    A window that is not full is not slept on, so such rows are returned unchanged; calling it twice is harmless.
    `state` is donated.
    """
    return sleep_rows(params, state, full_rows(state, config), config)


@functools.partial(jax.jit, static_argnames=("config",), donate_argnames=("state",))
def _wake(params, state, tokens, valid, config):
    h, state = consume(params, state, tokens, valid, config)
    return logits_of(params, h, config), state


def wake_step(
    params: Params, state: SleepState, tokens: jax.Array, config: Config, *, valid=None
) -> tuple[jax.Array, SleepState]:
    """Feeds the next n tokens (B, n) of each row's stream; returns their logits (B, n, vocab).

    Any n >= 1: a window that fills is slept on before the next token when more tokens follow, so streaming a
    sequence through `wake_step` in pieces of any sizes reproduces `forward`. `valid` (B, n) bool marks a prefix of
    each row's tokens as real (ragged rows; the rest are ignored and get NaN logits). `state` is donated.
    """
    check_tokens(tokens, config)
    chex.assert_equal(tokens.shape[0], state.sleep_input.shape[0])
    mask = jnp.ones(tokens.shape, bool) if valid is None else jnp.asarray(valid, bool)
    chex.assert_equal_shape([tokens, mask])
    check_masks(tokens.shape, valid, None, tokens.shape[1])  # one window of n: valid is a prefix
    return _wake(params, state, tokens, mask, config)
