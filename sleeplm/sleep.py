"""Wake and sleep (docs/method.md, "Windows, wake and sleep"): one definition of the semantics, used by training,
evaluation and streaming.

- `forward` / `forward_with_state`: the whole-sequence path (training / evaluation): `lax.scan` over windows; within
  each slept window a `lax.scan` over the N - 1 sleep passes.
- `wake_step` / `sleep_step`: the streaming path over an explicit `SleepState`; streaming the same tokens gives
  the same logits, and ends in the same state, as `forward_with_state`.

Both are built from one window pass of the block stack (`HybridLM.window_pass`) and `state.evict`.
"""

from __future__ import annotations

import functools
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from sleeplm.config import Config
from sleeplm.model.hybrid import HybridLM
from sleeplm.model.mixer import WindowContext, window_start, write_slots
from sleeplm.model.params import Annotated, annotations, unbox
from sleeplm.sharding import shard_batch
from sleeplm.state import SleepState, cache_length, evict, init_caches, reset, select_rows

Params = dict


def _init_boxed(key: jax.Array, config: Config) -> Params:
    window = config.sleep.window
    caches, context = init_caches(config, 1, window), window_start(1, 1)
    return HybridLM(config).init(key, jnp.zeros((1, 1), jnp.int32), caches, context)


def init_params(key: jax.Array, config: Config) -> Params:
    """Model parameters (float32) as a plain pytree (they do not depend on the eviction mode)."""
    return unbox(_init_boxed(key, config))


@functools.lru_cache(maxsize=64)
def param_annotations(config: Config) -> Params:
    """The params tree with each leaf's `Annotated` box (logical axes, optimiser role; no arrays are made)."""
    return annotations(jax.eval_shape(functools.partial(_init_boxed, config=config), jax.random.key(0)))


def param_logical_axes(config: Config) -> Params:
    """The params tree with each leaf's logical axes."""
    return jax.tree.map(lambda box: box.axes, param_annotations(config), is_leaf=lambda x: isinstance(x, Annotated))


def window_pass(
    params: Params,
    h: jax.Array,
    caches: tuple[Any, ...],
    context: WindowContext,
    config: Config,
    blocks: tuple[int, int] | None = None,
):
    """One pass of the block stack (or of `blocks` = (start, stop) only) over hidden states h (B, n, d) at the
    context's window positions; returns the last block's output and every block's cache after it."""
    return HybridLM(config).apply(params, h, caches, context, *(blocks or ()), method=HybridLM.window_pass)


def _embed(params, tokens, config):
    return HybridLM(config).apply(params, tokens, method=HybridLM.embed)


def logits_of(params, h, config):
    return HybridLM(config).apply(params, h, method=HybridLM.logits)


def check_tokens(tokens: jax.Array, config: Config) -> None:
    """Token ids must be a (batch, time) integer array inside the vocabulary. The range is checked when the ids are
    concrete (outside a jit); ids outside it would otherwise give NaN logits or wrap around silently."""
    chex.assert_rank(tokens, 2)
    if not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise ValueError(f"tokens must be integer ids of shape (batch, time), got dtype {tokens.dtype}")
    if isinstance(tokens, jax.core.Tracer) or tokens.size == 0:
        return
    with jax.ensure_compile_time_eval():  # two scalars, evaluated now even inside an enclosing trace
        low, high = (int(x) for x in jax.device_get((jnp.min(tokens), jnp.max(tokens))))
    if low < 0 or high >= config.model.vocab_size:
        bad = low if low < 0 else high
        raise ValueError(f"token id {bad} is outside the vocabulary: ids must be in [0, {config.model.vocab_size})")


def _pass_fn(config: Config):
    """The window pass, rematerialised in the backward pass when `sleep.remat` is set."""
    return jax.checkpoint(window_pass, static_argnums=(4, 5)) if config.sleep.remat else window_pass


def wake_pass(params: Params, h: jax.Array, caches: tuple[Any, ...], context: WindowContext, config: Config):
    """The wake pass: every block once. Returns the last block's output (for the logits), the looped blocks'
    output (what sleep pass 2 reads; the same unless `sleep.loop_layers` stops before the last block) and the
    caches."""
    pass_fn, (_, stop), blocks = _pass_fn(config), config.looped_blocks, len(config.model.layers)
    looped, caches = pass_fn(params, h, caches, context, config, (0, stop))
    if stop == blocks:
        return looped, looped, caches
    out, caches = pass_fn(params, looped, caches, context, config, (stop, blocks))
    return out, looped, caches


def sleep_passes(
    params: Params, hidden: jax.Array, caches: tuple[Any, ...], prev_valid: jax.Array, config: Config
) -> tuple[Any, ...]:
    """Passes 2..N over a full window (a `lax.scan`, N is never unrolled) of the looped blocks: each takes their
    previous output as input, and each continues from the cache it ended the previous pass with."""
    context = window_start(hidden.shape[0], hidden.shape[1], prev_valid)
    pass_fn, looped = _pass_fn(config), config.looped_blocks

    def one_pass(carry, _):
        h, caches = carry
        return pass_fn(params, h, caches, context, config, looped), None

    (_, caches), _ = lax.scan(one_pass, (hidden, caches), None, length=config.sleep.passes - 1)
    return caches


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


def check_masks(shape: tuple[int, int], valid: Any, document_start: Any, window: int) -> None:
    """Packed-row masks (B, T) as the caller gave them (None: the default), checked when concrete: within each
    window of L, `valid` is a prefix (a document's last window is padded at its end), padding only ends a document,
    and a document starts only at a window start, on a valid token. Defaults are not read (no transfer)."""
    given = [mask for mask in (valid, document_start) if mask is not None]
    if not given or any(isinstance(mask, jax.core.Tracer) for mask in given):
        return
    valid = np.ones(shape, bool) if valid is None else np.asarray(jax.device_get(valid), bool)
    document_start = (
        np.zeros(shape, bool) if document_start is None else np.asarray(jax.device_get(document_start), bool)
    )
    batch, length = shape
    padded = np.zeros((batch, -(-length // window) * window), bool)
    padded[:, :length] = valid
    windows = padded.reshape(batch, -1, window)
    rows, windows_index, offsets = np.nonzero(windows[:, :, 1:] & ~windows[:, :, :-1])
    if rows.size:
        raise ValueError(
            f"valid is not a prefix of each window of {window} tokens: row {rows[0]} has a valid token at position "
            f"{windows_index[0] * window + offsets[0] + 1} after padding (pad a document's last window at its end)"
        )
    starts = np.zeros_like(padded)
    starts[:, :length] = document_start
    first_valid, first_start = windows[:, 1:, 0], starts.reshape(batch, -1, window)[:, 1:, 0]
    rows, after = np.nonzero(~windows[:, :-1].all(-1) & first_valid & ~first_start)
    if rows.size:
        raise ValueError(
            f"row {rows[0]} continues a document at position {(after[0] + 1) * window} after a window with padding: "
            "padding may only end a document (the next window starts another, with document_start, or is padding)"
        )
    off = np.argwhere(document_start & ((np.arange(length) % window != 0) | ~valid))
    if off.size:
        row, position = off[0]
        raise ValueError(
            f"document_start is True at row {row}, position {position}: documents must start at a window start "
            f"(a multiple of {window}) on a valid token"
        )


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
    pass_fn = _pass_fn(config)
    resets, slept = _window_flags(valid, document_start, window)
    slept &= mode.bounded

    def one_window(carry, inputs):
        caches, prev_valid, pos, looped_buffer = carry
        x, valid_w, reset_w, slept_w = inputs
        caches, prev_valid = reset(caches, prev_valid, reset_w, capacity, config)
        pos = jnp.where(reset_w, 0, pos)
        context = WindowContext(pos, prev_valid, valid_w)
        run = lambda first, last: lambda operands: pass_fn(params, *operands, context, config, (first, last))
        keep = lambda operands: operands
        h, caches = run(0, start)((x, caches)) if start > 0 else (x, caches)

        def one_pass(pass_carry, index):
            """Pass `index` of the looped blocks on the previous pass's output (index 0: the wake pass)."""
            h, caches, wake_looped = pass_carry
            rows = (index == 0) | slept_w
            new = lax.cond(jnp.any(rows), run(start, stop), keep, (h, caches))
            h, caches = select_rows(rows, new, (h, caches))
            return (h, caches, jnp.where(index == 0, h, wake_looped)), None

        (_, caches, wake_looped), _ = lax.scan(one_pass, (h, caches, h), jnp.arange(passes))
        wake_out, caches = run(stop, blocks)((wake_looped, caches)) if stop < blocks else (wake_looped, caches)
        looped_buffer = write_slots(looped_buffer, wake_looped, pos, valid_w)
        caches, prev_valid = evict(caches, prev_valid, slept_w, config)
        pos = jnp.where(slept_w, 0, pos + jnp.sum(valid_w, axis=1, dtype=jnp.int32))
        if config.sleep.stop_gradient_between_windows:
            caches = lax.stop_gradient(caches)
        return (caches, prev_valid, pos, looped_buffer), shard_batch(wake_out)

    def windowed(x):  # (B, num_full * L, ...) -> (num_full, B, L, ...)
        return jnp.moveaxis(x[:, : num_full * window].reshape(batch, num_full, window, *x.shape[2:]), 1, 0)

    zeros = lambda: jnp.zeros((batch,), jnp.int32)
    looped_buffer = jnp.zeros((batch, capacity, d_model), embedded.dtype)
    carry = (init_caches(config, batch, capacity), zeros().astype(bool), zeros(), looped_buffer)
    inputs = (windowed(embedded), windowed(valid), resets[:num_full], slept[:num_full])
    (caches, prev_valid, pos, looped_buffer), hidden = lax.scan(one_window, carry, inputs)
    hidden = jnp.moveaxis(hidden, 0, 1).reshape(batch, num_full * window, d_model)
    if remainder:
        last_valid = valid[:, num_full * window :]
        caches, prev_valid = reset(caches, prev_valid, resets[num_full], capacity, config)
        pos = jnp.where(resets[num_full], 0, pos)
        context = WindowContext(pos, prev_valid, last_valid)
        last, looped, caches = wake_pass(params, embedded[:, num_full * window :], caches, context, config)
        hidden = jnp.concatenate([hidden, last], axis=1)
        looped_buffer = write_slots(looped_buffer, looped, pos, last_valid)
        pos = pos + jnp.sum(last_valid, axis=1, dtype=jnp.int32)
    return shard_batch(hidden), SleepState(caches, looped_buffer, pos, prev_valid)


def _sequence_masks(tokens, valid, document_start):
    valid = jnp.ones(tokens.shape, bool) if valid is None else jnp.asarray(valid, bool)
    document_start = jnp.zeros(tokens.shape, bool) if document_start is None else jnp.asarray(document_start, bool)
    chex.assert_equal_shape([tokens, valid, document_start])
    return valid, document_start


@functools.partial(jax.jit, static_argnames=("capacity", "config"))
def _forward(params, tokens, valid, document_start, capacity, config):
    embedded = _embed(params, tokens, config)
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
    masks = _sequence_masks(tokens, valid, document_start)  # shapes checked first
    check_masks(tokens.shape, valid, document_start, config.sleep.window)
    bounded = config.sleep.eviction_mode.bounded
    slots = cache_length(config, tokens.shape[1] if capacity is None and not bounded else capacity)
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


def at_last_token(values: jax.Array, count: jax.Array) -> jax.Array:
    """values[b, count[b] - 1] of (B, n, ...) values: each row's last fed token (row b's first when count is 0)."""
    index = jnp.maximum(count - 1, 0).reshape(-1, 1, *(1,) * (values.ndim - 2))
    return jnp.take_along_axis(values, index, axis=1)[:, 0]


def sleep_rows(params: Params, state: SleepState, rows: jax.Array, config: Config) -> SleepState:
    """Passes 2..N and eviction for `rows` (B,) bool, whose windows are full; other rows unchanged."""

    def consolidate(state: SleepState) -> SleepState:
        slept = sleep_passes(params, state.hidden, state.layers, state.prev_valid, config)
        caches, prev_valid = evict(select_rows(rows, slept, state.layers), state.prev_valid, rows, config)
        return SleepState(caches, state.hidden, jnp.where(rows, 0, state.pos), prev_valid)

    return lax.cond(jnp.any(rows), consolidate, lambda s: s, state)


def full_rows(state: SleepState, config: Config) -> jax.Array:
    """Rows whose window is full and can be slept on (never under the no-eviction mode)."""
    return (state.pos == state.window) & config.sleep.eviction_mode.bounded


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
    embedded = _embed(params, tokens, config)
    total = jnp.sum(valid, axis=1, dtype=jnp.int32)
    out = jnp.full((batch, length, config.model.d_model), jnp.nan, embedded.dtype)

    def pending(carry):
        state, consumed, _ = carry
        return jnp.any((consumed < total) & ((state.pos < state.window) | full_rows(state, config)))

    def step(carry):
        state, consumed, out = carry
        state = sleep_rows(params, state, full_rows(state, config) & (consumed < total), config)
        take = jnp.minimum(total - consumed, jnp.minimum(state.window - state.pos, chunk))
        index = jnp.clip(consumed[:, None] + jnp.arange(chunk), 0, length - 1)
        x = jnp.take_along_axis(embedded, index[:, :, None], axis=1)
        context = WindowContext(state.pos, state.prev_valid, jnp.arange(chunk) < take[:, None])
        h, looped, caches = wake_pass(params, x, state.layers, context, config)
        hidden = write_slots(state.hidden, looped, state.pos, context.valid)
        out = write_slots(out, h, consumed, context.valid)
        return SleepState(caches, hidden, state.pos + take, state.prev_valid), consumed + take, out

    state, _, out = lax.while_loop(pending, step, (state, jnp.zeros((batch,), jnp.int32), out))
    return out, state


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
    chex.assert_equal(tokens.shape[0], state.hidden.shape[0])
    mask = jnp.ones(tokens.shape, bool) if valid is None else jnp.asarray(valid, bool)
    chex.assert_equal_shape([tokens, mask])
    check_masks(tokens.shape, valid, None, tokens.shape[1])  # one window of n: valid is a prefix
    return _wake(params, state, tokens, mask, config)
