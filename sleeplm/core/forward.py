"""The whole-sequence path (training, evaluation): `forward` and `forward_with_state`, a `lax.scan` over windows
and, within each slept window, a `lax.scan` over the N - 1 sleep passes (docs/method.md, "Windows, wake and sleep").
Streaming the same tokens through `sleeplm.core.streaming` gives the same logits and ends in the same state."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from sleeplm.config import Config
from sleeplm.core.checks import check_masks, check_tokens, sequence_masks
from sleeplm.core.parameters import Params
from sleeplm.core.passes import embed, logits_of, pass_fn, wake_pass
from sleeplm.core.state import SleepState, evict, init_caches, reset, select_rows, state_capacity
from sleeplm.model.mixer import WindowContext, write_slots
from sleeplm.parallel.axes import shard_batch


def _window_flags(valid: jax.Array, document_start: jax.Array, window: int) -> tuple[jax.Array, jax.Array]:
    """Per window and row: whether a new document starts there (its caches reset first), and whether the window is
    slept on: it is full and the same document continues in the next window. Both (num_windows, B)."""
    length = valid.shape[1]
    starts = jnp.arange(0, length, window)
    resets = document_start[:, starts].T
    following = starts + window  # the next window's first position
    full = (following <= length)[:, None] & valid[:, jnp.minimum(following, length) - 1].T  # valid is a prefix
    next_index = jnp.minimum(following, length - 1)
    continues = (following < length)[:, None] & valid[:, next_index].T & ~document_start[:, next_index].T
    return resets, full & continues


def _forward_hidden(
    params: Params, embedded: jax.Array, valid: jax.Array, document_start: jax.Array, capacity: int, config: Config
) -> tuple[jax.Array, SleepState]:
    """Last-block hidden states (B, T, d) of the wake pass at every position of a whole sequence, and the state a
    stream of the same tokens ends in.

    Windows of L are scanned one by one; inside a window a `lax.scan` runs the N passes of the looped blocks, passes
    2..N only for rows whose window is slept on (full and followed by more of the same document), so the scan body
    holds a single copy of each block (blocks before or after the looped ones run once, in the wake pass); a slept
    window is then evicted. A row's caches reset at a window where a document starts. A partial last window (never
    slept on) runs once more at its own length rather than padded to a whole window.
    Without eviction ("none") the caches hold `capacity` slots (at least the sequence): windows are only the steps of
    the scan, each attending to every earlier slot of its document, and nothing is slept on.
    """
    batch, length, d_model = embedded.shape
    mode, window = config.sleep.eviction_mode, config.sleep.window
    passes, (start, stop), blocks = config.sleep.passes, config.looped_blocks, len(config.model.layers)
    num_full, remainder = divmod(length, window)
    embedded = shard_batch(embedded)
    run_pass = pass_fn(config)
    resets, slept = _window_flags(valid, document_start, window)
    slept &= mode.bounded

    def one_window(carry, inputs):
        caches, prev_valid, pos, sleep_input = carry
        x, valid_w, reset_w, slept_w = inputs
        caches, prev_valid = reset(caches, prev_valid, reset_w, capacity, config)
        pos = jnp.where(reset_w, 0, pos)
        context = WindowContext(pos, prev_valid, valid_w)
        run = lambda first, last: lambda operands: run_pass(params, *operands, context, config, (first, last))
        keep = lambda operands: operands
        h, caches = run(0, start)((x, caches)) if start > 0 else (x, caches)

        def one_pass(pass_carry, index):
            """Pass `index` of the looped blocks on the previous pass's output (index 0: the wake pass)."""
            h, caches, window_sleep_input = pass_carry
            rows = (index == 0) | slept_w
            new = lax.cond(jnp.any(rows), run(start, stop), keep, (h, caches))
            h, caches = select_rows(rows, new, (h, caches))
            return (h, caches, jnp.where(index == 0, h, window_sleep_input)), None

        (_, caches, window_sleep_input), _ = lax.scan(one_pass, (h, caches, h), jnp.arange(passes))
        after_looped = (window_sleep_input, caches)
        wake_out, caches = run(stop, blocks)(after_looped) if stop < blocks else after_looped
        sleep_input = write_slots(sleep_input, window_sleep_input, pos, valid_w)
        caches, prev_valid = evict(caches, prev_valid, slept_w, config)
        pos = jnp.where(slept_w, 0, pos + jnp.sum(valid_w, axis=1, dtype=jnp.int32))
        if config.sleep.stop_gradient_between_windows:
            caches = lax.stop_gradient(caches)
        return (caches, prev_valid, pos, sleep_input), shard_batch(wake_out)

    def windowed(x):  # (B, num_full * L, ...) -> (num_full, B, L, ...)
        return jnp.moveaxis(x[:, : num_full * window].reshape(batch, num_full, window, *x.shape[2:]), 1, 0)

    zeros = lambda: jnp.zeros((batch,), jnp.int32)
    sleep_input = jnp.zeros((batch, capacity, d_model), embedded.dtype)
    carry = (init_caches(config, batch, capacity), zeros().astype(bool), zeros(), sleep_input)
    inputs = (windowed(embedded), windowed(valid), resets[:num_full], slept[:num_full])
    (caches, prev_valid, pos, sleep_input), hidden = lax.scan(one_window, carry, inputs)
    hidden = jnp.moveaxis(hidden, 0, 1).reshape(batch, num_full * window, d_model)
    if remainder:
        last_valid = valid[:, num_full * window :]
        caches, prev_valid = reset(caches, prev_valid, resets[num_full], capacity, config)
        pos = jnp.where(resets[num_full], 0, pos)
        context = WindowContext(pos, prev_valid, last_valid)
        last, looped, caches = wake_pass(params, embedded[:, num_full * window :], caches, context, config)
        hidden = jnp.concatenate([hidden, last], axis=1)
        sleep_input = write_slots(sleep_input, looped, pos, last_valid)
        pos = pos + jnp.sum(last_valid, axis=1, dtype=jnp.int32)
    return shard_batch(hidden), SleepState(caches, sleep_input, pos, prev_valid)


@functools.partial(jax.jit, static_argnames=("capacity", "config"))
def _forward(params, tokens, valid, document_start, capacity, config):
    embedded = embed(params, tokens, config)
    hidden, state = _forward_hidden(params, embedded, valid, document_start, capacity, config)
    return logits_of(params, hidden, config), state


def forward_with_state(
    params: Params, tokens: jax.Array, config: Config, *, valid=None, document_start=None, capacity=None
) -> tuple[jax.Array, SleepState]:
    """`forward`'s logits and the `SleepState` after the last token: what streaming the same tokens through
    `wake_step` ends in (its last window not yet slept on), so a stream can continue from it.

    Under the no-eviction mode the state holds `capacity` tokens per row (default: the sequence's length, which
    leaves no room to continue); under the evicting modes `capacity` must be None.
    """
    check_tokens(tokens, config)
    masks = sequence_masks(tokens, valid, document_start)  # shapes checked first
    check_masks(tokens.shape, valid, document_start, config.sleep.window)
    bounded = config.sleep.eviction_mode.bounded
    slots = state_capacity(config, tokens.shape[1] if capacity is None and not bounded else capacity)
    if not bounded and slots < tokens.shape[1]:
        raise ValueError(f"capacity={capacity} is invalid: it must hold the whole sequence, {tokens.shape[1]} tokens")
    return _forward(params, tokens, *masks, slots, config)


def forward(params: Params, tokens: jax.Array, config: Config, *, valid=None, document_start=None) -> jax.Array:
    """Logits (B, T, vocab) float32 for whole sequences tokens (B, T): windows of L, N passes per slept window.

    Packed rows (several documents one after another) pass `valid` (B, T) bool, False on padding, which changes no
    state, and `document_start` (B, T) bool, True where a document starts, always at a window start: every cache
    of the row resets there, and a window is slept on only when the same document continues after it.
    """
    return forward_with_state(params, tokens, config, valid=valid, document_start=document_start)[0]
