"""Parameters that say what they are for, declared where they are created.

Every parameter is created through `param` or `dense` with its logical axes (one name or None per dim, mapped to
mesh axes by the sharding rules, `sleeplm.sharding`) and whether it is a hidden matrix (optimised by Muon; all
others by AdamW), and whether it is new (created inside `new_parameters()`: a block a retrofit inserted, which
`train.trainable="new"` trains alone). The annotation is flax axis metadata: `init` returns it boxed around each
array, `apply` unboxes it, and `annotations` reads it back. Sharding and the optimizer's labels come from here;
nothing matches on names.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct
from flax.core import meta

from sleeplm.parallel.axes import LogicalAxes


@struct.dataclass
class Annotated(meta.AxisMetadata):
    """A parameter with its logical axes and its optimiser role."""

    value: Any
    axes: LogicalAxes = struct.field(pytree_node=False)
    hidden_matrix: bool = struct.field(pytree_node=False, default=False)
    new: bool = struct.field(pytree_node=False, default=False)

    def unbox(self) -> Any:
        return self.value

    def replace_boxed(self, val: Any) -> Annotated:
        return self.replace(value=val)

    def add_axis(self, index: int, params: dict) -> Annotated:
        return self.replace(axes=LogicalAxes((*self.axes[:index], None, *self.axes[index:])))

    def remove_axis(self, index: int, params: dict) -> Annotated:
        return self.replace(axes=LogicalAxes((*self.axes[:index], *self.axes[index + 1 :])))


_creating_new = contextvars.ContextVar("sleeplm_new_parameters", default=False)


@contextlib.contextmanager
def new_parameters(new: bool = True) -> Iterator[None]:
    """Parameters created inside the block are declared new when `new` (a retrofit's inserted blocks)."""
    token = _creating_new.set(new)
    try:
        yield
    finally:
        _creating_new.reset(token)


def annotated_init(init: Callable, axes: LogicalAxes, hidden_matrix: bool = False) -> Callable:
    """`init` whose result is boxed with its annotation (an initializer for `nn.Module.param` or flax layers)."""

    def boxed(key, shape, dtype=jnp.float32):
        if len(axes) != len(shape):
            raise ValueError(f"logical axes {axes} do not match a parameter of shape {shape}")
        return Annotated(init(key, shape, dtype), LogicalAxes(axes), hidden_matrix, _creating_new.get())

    return boxed


def param(
    module: nn.Module, name: str, init: Callable, shape: tuple[int, ...], axes: LogicalAxes, hidden_matrix=False
) -> jax.Array:
    """A float32 parameter of `module` with its annotation."""
    return module.param(name, annotated_init(init, axes, hidden_matrix), shape, jnp.float32)


def dense(
    features: int, axes: LogicalAxes, name: str | None = None, dtype=None, hidden_matrix: bool = True, **kwargs
) -> nn.Dense:
    """A bias-free `nn.Dense` whose kernel (in, out) has logical axes `axes`; a hidden matrix unless told otherwise."""
    init = kwargs.pop("kernel_init", nn.initializers.lecun_normal())
    kernel_init = annotated_init(init, axes, hidden_matrix)
    return nn.Dense(features, use_bias=False, dtype=dtype, kernel_init=kernel_init, name=name, **kwargs)


def is_annotated(x: Any) -> bool:
    return isinstance(x, Annotated)


def annotations(boxed: Any) -> Any:
    """The `Annotated` boxes of a tree from `init` (or `jax.eval_shape` of it); fails naming any parameter that was
    created without an annotation, so a new layer cannot be silently replicated or given the wrong optimiser."""

    def check(path, leaf):
        if not is_annotated(leaf):
            raise ValueError(
                f"parameter {jax.tree_util.keystr(path)} has no annotation: create it with sleeplm.model.params.param "
                "or dense (logical axes and optimiser role)"
            )
        return leaf

    return jax.tree_util.tree_map_with_path(check, boxed, is_leaf=is_annotated)


def unbox(boxed: Any) -> Any:
    """The plain arrays of a boxed tree."""
    return meta.unbox(boxed)
