"""Logical axes and how they map onto a device mesh: the mesh axis names, the rule sets, the rules in force while a
function is traced, and the constraints and specs derived from them.

Parameters, caches and activations name their dims logically ("batch", "embed", "heads", "mlp", "vocab"); a rule
set maps each logical name to mesh axes (in the spirit of maxtext's rule files). Everything that shards, from the
train state's layout to the `shard_map` around a kernel that GSPMD cannot see into, reads the same rules.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Mapping

import jax
from jax import lax
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")


class LogicalAxes(tuple):
    """The logical name (or None) of each dim of an array. A tuple subclass, so a tree of them keeps each one whole
    as a leaf (a plain tuple would be a pytree node)."""

    def __new__(cls, axes=()):
        axes = tuple(axes)
        if not all(a is None or isinstance(a, str) for a in axes):
            raise ValueError(f"logical axes {axes} must each be a name or None")
        return super().__new__(cls, axes)


Rules = Mapping[str, str | tuple[str, ...] | None]

# "fsdp+tp" is the general rule set: on a mesh axis of size 1 its entries are no-ops. "optimizer_embed" shards the
# optimizer state's embed dim where the params' is not (ZeRO-1): under "dp" each device then updates 1/n of every
# matrix instead of repeating the whole (Muon) update, and the new params are all-gathered. Without it the optimizer
# cost 5x its single-device time on 8 fake CPU devices (benchmarks/RESULTS.md).
RULES: dict[str, Rules] = {
    "dp": {
        "batch": BATCH_AXES,
        "embed": None,
        "heads": None,
        "mlp": None,
        "vocab": None,
        "optimizer_embed": BATCH_AXES,
    },
    "fsdp": {"batch": BATCH_AXES, "embed": "fsdp", "heads": None, "mlp": None, "vocab": None},
    "fsdp+tp": {"batch": BATCH_AXES, "embed": "fsdp", "heads": "tensor", "mlp": "tensor", "vocab": "tensor"},
}
DEFAULT_RULES = "fsdp+tp"

_active_rules: contextvars.ContextVar[Rules] = contextvars.ContextVar("sleeplm_rules", default=RULES[DEFAULT_RULES])


def rules_named(name: str) -> Rules:
    if name not in RULES:
        raise ValueError(f"rules={name!r} is unknown: choose one of {sorted(RULES)}")
    return RULES[name]


@contextlib.contextmanager
def use_rules(rules: Rules) -> Iterator[None]:
    """Makes `rules` the ones in force (for constraints and per-shard kernels) while tracing inside the block."""
    token = _active_rules.set(rules)
    try:
        yield
    finally:
        _active_rules.reset(token)


def active_rules() -> Rules:
    return _active_rules.get()


def logical_to_spec(axes: LogicalAxes, rules: Rules | None = None) -> P:
    """The PartitionSpec of an array whose dims have the logical names `axes` (None: not split)."""
    rules = active_rules() if rules is None else rules
    return P(*(rules.get(a) if a else None for a in axes))


def mesh_axes_of(spec: P) -> tuple[str, ...]:
    """Every mesh axis a PartitionSpec names, in order."""
    return tuple(a for entry in spec if entry for a in ((entry,) if isinstance(entry, str) else entry))


def constrain(x: jax.Array, axes: LogicalAxes) -> jax.Array:
    """A sharding constraint on x by its logical dims, when traced under a mesh that has the mesh axes; else x."""
    mesh, spec = jax.sharding.get_abstract_mesh(), logical_to_spec(axes)
    if mesh.empty or not set(mesh_axes_of(spec)) <= set(mesh.axis_names):
        return x
    return lax.with_sharding_constraint(x, spec)


def shard_batch(x: jax.Array) -> jax.Array:
    """Constrains x's leading (batch) dim to the batch axes of the rules in force."""
    return constrain(x, ("batch",) + (None,) * (x.ndim - 1))
