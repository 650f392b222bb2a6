"""Wake and sleep (SPEC §3): one definition of the semantics, used by training, evaluation and streaming.

- `forward`: the whole-sequence path (training / evaluation): `lax.scan` over windows; within each slept window
  a `lax.scan` over the N - 1 sleep passes.
- `wake_step` / `sleep_step`: the streaming path over an explicit `SleepState`; streaming the same tokens gives
  the same logits as `forward`.

Both are built from `window_pass` (one pass of the block stack over window positions) and `state.evict`.
"""

from __future__ import annotations

import dataclasses
import functools

import chex
import jax
import jax.numpy as jnp
from jax import lax

from sleeplm.config import Config
from sleeplm.constraints import shard_batch
from sleeplm.model.hybrid import HybridLM
from sleeplm.state import LayerState, SleepState, evict, init_layer_states, init_state

Params = dict


def init_params(key: jax.Array, config: Config) -> Params:
    """Model parameters (float32) as a plain pytree (they do not depend on the eviction mode)."""
    state = init_state(whole_sequence_window(config, config.sleep.window), 1)
    tokens = jnp.zeros((1, 1), jnp.int32)
    return HybridLM(config).init(key, tokens, state.layers, state.pos, state.prev_valid)


def whole_sequence_window(config: Config, length: int) -> Config:
    """For the no-eviction baseline (eviction "none"): the same model with one window of `length` tokens."""
    if config.sleep.eviction != "none":
        return config
    return dataclasses.replace(config, sleep=dataclasses.replace(config.sleep, window=length, eviction="hard"))


def _window_pass(params, h, layers, pos, prev_valid, config):
    return HybridLM(config).apply(params, h, layers, pos, prev_valid, method=HybridLM.window_pass)


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
    return jax.checkpoint(_window_pass, static_argnums=(5,)) if config.sleep.remat else _window_pass


def sleep_passes(
    params: Params, hidden: jax.Array, layers: tuple[LayerState, ...], prev_valid: jax.Array, config: Config
) -> tuple[LayerState, ...]:
    """Passes 2..N over a full window (a `lax.scan`, N is never unrolled): each takes the previous pass's last
    hidden states as input, and each layer continues from the state it ended the previous pass with."""

    def one_pass(carry, _):
        h, layers = carry
        return pass_fn(params, h, layers, 0, prev_valid, config), None

    pass_fn = _pass_fn(config)
    (_, layers), _ = lax.scan(one_pass, (hidden, layers), None, length=config.sleep.passes - 1)
    return layers


def _forward_hidden(params: Params, embedded: jax.Array, config: Config) -> jax.Array:
    """Last-block hidden states (B, T, d) of the wake pass at every position of a whole sequence.

    Full windows are scanned one by one; inside a window a `lax.scan` runs the N passes, passes 2..N only when the
    window is slept on (every window but the last), so the scan body holds a single copy of the window pass. A
    partial last window (never slept on) runs once more at its own length rather than padded to a whole window.
    """
    batch, length, d_model = embedded.shape
    config = whole_sequence_window(config, length)
    window, passes = config.sleep.window, config.sleep.passes
    num_full, remainder = divmod(length, window)
    embedded = shard_batch(embedded)
    pass_fn = _pass_fn(config)

    def one_window(carry, inputs):
        layers, prev_valid = carry
        x, window_slept = inputs

        def one_pass(pass_carry, index):
            h, layers, wake_h = pass_carry
            run = lambda operands: pass_fn(params, *operands, 0, prev_valid, config)
            h, layers = lax.cond((index == 0) | window_slept, run, lambda operands: operands, (h, layers))
            return (h, layers, jnp.where(index == 0, h, wake_h)), None

        (_, layers, wake_h), _ = lax.scan(one_pass, (x, layers, x), jnp.arange(passes))
        layers, prev_valid = evict(layers, config)
        if config.sleep.stop_gradient_between_windows:
            layers = lax.stop_gradient(layers)
        return (layers, prev_valid), shard_batch(wake_h)

    carry = (init_layer_states(config, batch), jnp.zeros((), bool))
    windows = jnp.moveaxis(embedded[:, : num_full * window].reshape(batch, num_full, window, d_model), 1, 0)
    slept = (jnp.arange(num_full) < num_full - 1) | (remainder > 0)  # full windows followed by more tokens
    (layers, prev_valid), hidden = lax.scan(one_window, carry, (windows, slept))
    hidden = jnp.moveaxis(hidden, 0, 1).reshape(batch, num_full * window, d_model)
    if remainder:
        last, _ = pass_fn(params, embedded[:, num_full * window :], layers, 0, prev_valid, config)
        hidden = jnp.concatenate([hidden, last], axis=1)
    return shard_batch(hidden)


@functools.partial(jax.jit, static_argnames=("config",))
def forward(params: Params, tokens: jax.Array, config: Config) -> jax.Array:
    """Logits (B, T, vocab) float32 for whole sequences tokens (B, T), windows of L, N passes per slept window."""
    _check_tokens(tokens)
    return _logits(params, _forward_hidden(params, _embed(params, tokens, config), config), config)


def _sleep_if_full(params: Params, state: SleepState, config: Config) -> SleepState:
    """Passes 2..N and eviction when the window is full; otherwise the state unchanged."""

    def consolidate(state: SleepState) -> SleepState:
        layers = sleep_passes(params, state.hidden, state.layers, state.prev_valid, config)
        layers, prev_valid = evict(layers, config)
        return state._replace(layers=layers, pos=jnp.zeros_like(state.pos), prev_valid=prev_valid)

    return lax.cond(state.pos == config.sleep.window, consolidate, lambda s: s, state)


@functools.partial(jax.jit, static_argnames=("config",), donate_argnames=("state",))
def sleep_step(params: Params, state: SleepState, config: Config) -> SleepState:
    """Sleeps on the current window if it is full: N - 1 passes from the wake pass's hidden states, then eviction.

    A window that is not full is not slept on (SPEC §3), so the state is then returned unchanged; calling it twice
    is harmless. `state` is donated.
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
    h, layers = _window_pass(params, _embed(params, tokens, config), state.layers, state.pos, state.prev_valid, config)
    hidden = lax.dynamic_update_slice(state.hidden, h.astype(state.hidden.dtype), (0, state.pos, 0))
    new_state = SleepState(layers, hidden, state.pos + length, state.prev_valid)
    return _logits(params, h, config), new_state
