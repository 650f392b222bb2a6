"""Sharding hints for activations: no-ops unless traced under a mesh (`jax.set_mesh`) that has the batch axes."""

from __future__ import annotations

import jax
from jax import lax
from jax.sharding import PartitionSpec as P

BATCH_AXES = ("data", "fsdp")


def shard_batch(x: jax.Array) -> jax.Array:
    """Constrains x's leading (batch) dim to the mesh's batch axes, when such a mesh is active."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not set(BATCH_AXES) <= set(mesh.axis_names):
        return x
    return lax.with_sharding_constraint(x, P(BATCH_AXES))
