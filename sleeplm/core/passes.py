"""One pass of the block stack over a window's tokens, the wake pass and the sleep passes: the pieces both the
whole-sequence path (`forward`) and the streaming path (`wake_step`, `sleep_step`) are built from."""

from __future__ import annotations

from typing import Any

import jax
from jax import lax

from sleeplm.config import Config
from sleeplm.core.parameters import Params
from sleeplm.model.hybrid import HybridLM
from sleeplm.model.mixer import WindowContext, window_start


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


def embed(params, tokens, config):
    return HybridLM(config).apply(params, tokens, method=HybridLM.embed)


def logits_of(params, h, config):
    return HybridLM(config).apply(params, h, method=HybridLM.logits)


def pass_fn(config: Config):
    """The window pass, rematerialised in the backward pass when `sleep.remat` is set."""
    return jax.checkpoint(window_pass, static_argnums=(4, 5)) if config.sleep.remat else window_pass


def wake_pass(params: Params, h: jax.Array, caches: tuple[Any, ...], context: WindowContext, config: Config):
    """The wake pass: every block once. Returns the last block's output (for the logits), the looped blocks'
    output (what sleep pass 2 reads; the same unless `sleep.loop_layers` stops before the last block) and the
    caches."""
    run_pass, (_, stop), blocks = pass_fn(config), config.looped_blocks, len(config.model.layers)
    looped, caches = run_pass(params, h, caches, context, config, (0, stop))
    if stop == blocks:
        return looped, looped, caches
    out, caches = run_pass(params, looped, caches, context, config, (stop, blocks))
    return out, looped, caches


def sleep_passes(
    params: Params, hidden: jax.Array, caches: tuple[Any, ...], prev_valid: jax.Array, config: Config
) -> tuple[Any, ...]:
    """Passes 2..N over a full window (a `lax.scan`, N is never unrolled) of the looped blocks: each takes their
    previous output as input, and each continues from the cache it ended the previous pass with."""
    context = window_start(hidden.shape[0], hidden.shape[1], prev_valid)
    run_pass, looped = pass_fn(config), config.looped_blocks

    def one_pass(carry, _):
        h, caches = carry
        return run_pass(params, h, caches, context, config, looped), None

    (_, caches), _ = lax.scan(one_pass, (hidden, caches), None, length=config.sleep.passes - 1)
    return caches
