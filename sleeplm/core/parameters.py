"""The model's parameters: initialised from a config, and their declared annotations (logical axes, optimiser role,
newness) without making any array."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from sleeplm.config import Config
from sleeplm.core.state import init_caches
from sleeplm.model.hybrid import HybridLM
from sleeplm.model.mixer import window_start
from sleeplm.model.params import Annotated, annotations, unbox

Params = dict


def _init_boxed(key: jax.Array, config: Config) -> Params:
    caches, context = init_caches(config, 1, config.sleep.window), window_start(1, 1)
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
