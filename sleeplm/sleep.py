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
from jax import lax

from sleeplm.config import Config
from sleeplm.model.hybrid import HybridLM
from sleeplm.model.mixer import WindowContext
from sleeplm.model.params import Annotated, annotations, unbox
from sleeplm.sharding import shard_batch
from sleeplm.state import SleepState, evict, init_caches

Params = dict


def _init_boxed(key: jax.Array, config: Config) -> Params:
    window = config.sleep.window
    context = WindowContext(jnp.zeros((), jnp.int32), jnp.zeros((), bool))
    return HybridLM(config).init(key, jnp.zeros((1, 1), jnp.int32), init_caches(config, 1, window), context)


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


def _window_pass(params, h, caches, context, config):
    return HybridLM(config).apply(params, h, caches, context, method=HybridLM.window_pass)


def _embed(params, tokens, config):
    return HybridLM(config).apply(params, tokens, method=HybridLM.embed)


def _logits(params, h, config):
    return HybridLM(config).apply(params, h, method=HybridLM.logits)


def _check_tokens(tokens: jax.Array) -> None:
    chex.assert_rank(tokens, 2)
    if not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise ValueError(f"tokens must be integer ids of shape (batch, time), got dtype {tokens.dtype}")


def _pass_fn(config: Config):
    """The window pass, rematerialised in the backward pass when `sleep.remat` is set."""
    return jax.checkpoint(_window_pass, static_argnums=(4,)) if config.sleep.remat else _window_pass


def _window_start(prev_valid: jax.Array) -> WindowContext:
    return WindowContext(jnp.zeros((), jnp.int32), prev_valid)


def sleep_passes(
    params: Params, hidden: jax.Array, caches: tuple[Any, ...], prev_valid: jax.Array, config: Config
) -> tuple[Any, ...]:
    """Passes 2..N over a full window (a `lax.scan`, N is never unrolled): each takes the previous pass's last
    hidden states as input, and each layer continues from the cache it ended the previous pass with."""

    def one_pass(carry, _):
        h, caches = carry
        return pass_fn(params, h, caches, _window_start(prev_valid), config), None

    pass_fn = _pass_fn(config)
    (_, caches), _ = lax.scan(one_pass, (hidden, caches), None, length=config.sleep.passes - 1)
    return caches


def _forward_hidden(params: Params, embedded: jax.Array, config: Config) -> tuple[jax.Array, SleepState]:
    """Last-block hidden states (B, T, d) of the wake pass at every position of a whole sequence, and the state a
    stream of the same tokens ends in.

    Full windows are scanned one by one; inside a window a `lax.scan` runs the N passes, passes 2..N only when the
    window is slept on (every window that more tokens follow), so the scan body holds a single copy of the window
    pass; a slept window is then evicted. A partial last window (never slept on) runs once more at its own length
    rather than padded to a whole window. Without eviction ("none") the whole sequence is one window.
    """
    batch, length, d_model = embedded.shape
    window = config.sleep.eviction_mode.window_length(config.sleep.window, length)
    passes = config.sleep.passes
    num_full, remainder = divmod(length, window)
    embedded = shard_batch(embedded)
    pass_fn = _pass_fn(config)

    def one_window(carry, inputs):
        caches, prev_valid = carry
        x, window_slept = inputs

        def one_pass(pass_carry, index):
            h, caches, wake_h = pass_carry
            run = lambda operands: pass_fn(params, *operands, _window_start(prev_valid), config)
            h, caches = lax.cond((index == 0) | window_slept, run, lambda operands: operands, (h, caches))
            return (h, caches, jnp.where(index == 0, h, wake_h)), None

        (_, caches, wake_h), _ = lax.scan(one_pass, (x, caches, x), jnp.arange(passes))
        ended = (caches, prev_valid)
        evicted = evict(caches, config)
        caches, prev_valid = jax.tree.map(lambda e, kept: jnp.where(window_slept, e, kept), evicted, ended)
        if config.sleep.stop_gradient_between_windows:
            caches = lax.stop_gradient(caches)
        return (caches, prev_valid), shard_batch(wake_h)

    carry = (init_caches(config, batch, window), jnp.zeros((), bool))
    windows = jnp.moveaxis(embedded[:, : num_full * window].reshape(batch, num_full, window, d_model), 1, 0)
    slept = (jnp.arange(num_full) < num_full - 1) | (remainder > 0)  # full windows followed by more tokens
    (caches, prev_valid), hidden = lax.scan(one_window, carry, (windows, slept))
    hidden = jnp.moveaxis(hidden, 0, 1).reshape(batch, num_full * window, d_model)
    if remainder:
        last, caches = pass_fn(params, embedded[:, num_full * window :], caches, _window_start(prev_valid), config)
        hidden = jnp.concatenate([hidden, last], axis=1)
        window_hidden = jnp.zeros((batch, window, d_model), hidden.dtype).at[:, :remainder].set(last)
    else:
        window_hidden = hidden[:, -window:]
    state = SleepState(caches, window_hidden, jnp.asarray(remainder or window, jnp.int32), prev_valid)
    return shard_batch(hidden), state


@functools.partial(jax.jit, static_argnames=("config",))
def forward(params: Params, tokens: jax.Array, config: Config) -> jax.Array:
    """Logits (B, T, vocab) float32 for whole sequences tokens (B, T), windows of L, N passes per slept window."""
    return forward_with_state(params, tokens, config)[0]


@functools.partial(jax.jit, static_argnames=("config",))
def forward_with_state(params: Params, tokens: jax.Array, config: Config) -> tuple[jax.Array, SleepState]:
    """`forward`'s logits and the `SleepState` after the last token: what streaming the same tokens through
    `wake_step` ends in (its last window not yet slept on), so a stream can continue from it."""
    _check_tokens(tokens)
    hidden, state = _forward_hidden(params, _embed(params, tokens, config), config)
    return _logits(params, hidden, config), state


def _sleep_if_full(params: Params, state: SleepState, config: Config) -> SleepState:
    """Passes 2..N and eviction when the window is full; otherwise the state unchanged."""

    def consolidate(state: SleepState) -> SleepState:
        caches = sleep_passes(params, state.hidden, state.layers, state.prev_valid, config)
        caches, prev_valid = evict(caches, config)
        return state._replace(layers=caches, pos=jnp.zeros_like(state.pos), prev_valid=prev_valid)

    return lax.cond(state.pos == config.sleep.window, consolidate, lambda s: s, state)


@functools.partial(jax.jit, static_argnames=("config",), donate_argnames=("state",))
def sleep_step(params: Params, state: SleepState, config: Config) -> SleepState:
    """Sleeps on the current window if it is full: N - 1 passes from the wake pass's hidden states, then eviction.

    A window that is not full is not slept on, so the state is then returned unchanged; calling it twice is
    harmless. `state` is donated.
    """
    return _sleep_if_full(params, state, config)


@functools.partial(jax.jit, static_argnames=("config",), donate_argnames=("state",))
def wake_step(params: Params, state: SleepState, tokens: jax.Array, config: Config) -> tuple[jax.Array, SleepState]:
    """One wake pass over the next n tokens (B, n) of the current window; returns their logits (B, n, vocab).

    If the window is already full it is slept on first (more tokens follow it), so streaming a sequence through
    `wake_step` alone reproduces `forward`. The n tokens must fit in the window: 1 <= n <= L - pos (after that
    automatic sleep). `state` is donated.
    """
    _check_tokens(tokens)
    length, window = tokens.shape[1], config.sleep.window
    if not 1 <= length <= window:
        raise ValueError(f"wake_step got {length} tokens: 1..window={window} tokens fit in one window")
    chex.assert_equal(tokens.shape[0], state.hidden.shape[0])
    state = _sleep_if_full(params, state, config)
    context = WindowContext(state.pos, state.prev_valid)
    h, caches = _window_pass(params, _embed(params, tokens, config), state.layers, context, config)
    hidden = lax.dynamic_update_slice(state.hidden, h.astype(state.hidden.dtype), (0, state.pos, 0))
    new_state = SleepState(caches, hidden, state.pos + length, state.prev_valid)
    return _logits(params, h, config), new_state
