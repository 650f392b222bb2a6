"""The gated delta rule behind one interface: `gated_delta_rule(..., implementation=...)`.

Implementations, all with the signature `(q, k, v, g, beta, initial_state, chunk_size) -> (o, final_state)`:
- "reference": the token-by-token recurrence (`lax.scan`), the ground truth;
- "xla": the chunkwise-parallel form in plain `jax.numpy` (any backend);
- "pallas": the Pallas kernels of `pallas_kernels.gated_delta` (interpret mode on CPU), imported on first use and
  run per shard under a mesh;
- "auto": the fastest for the default backend ("pallas" on GPU/TPU, else "xla").
`register_implementation` adds more; the registry is the one list of names (`sleeplm.core.checks.check_config`
checks a config against it where the config is first used).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from sleeplm.ops.chunked import gated_delta_rule_chunked, unit_lower_triangular_inverse
from sleeplm.ops.reference import gated_delta_rule_reference
from sleeplm.parallel.axes import active_rules, mesh_axes_of

GatedDeltaRuleFn = Callable[..., tuple[jax.Array, jax.Array]]


@dataclasses.dataclass(frozen=True)
class Implementation:
    """One way of computing the rule. `per_shard`: opaque to GSPMD (a kernel), so under a mesh it runs per shard
    through `jax.shard_map`, split over the batch and head dims as the sharding rules in force say."""

    fn: GatedDeltaRuleFn
    per_shard: bool = False


def _pallas(*args, **kwargs):
    """The Pallas kernels, imported on first use (a separate package: importing sleeplm does not load Pallas)."""
    from pallas_kernels.gated_delta import gated_delta_rule_pallas

    return gated_delta_rule_pallas(*args, **kwargs)


IMPLEMENTATIONS: dict[str, Implementation] = {
    "reference": Implementation(gated_delta_rule_reference),
    "xla": Implementation(gated_delta_rule_chunked),
    "pallas": Implementation(_pallas, per_shard=True),
}


def register_implementation(name: str, fn: GatedDeltaRuleFn, *, per_shard: bool = False) -> None:
    """Adds (or replaces) an implementation; `ModelConfig(gdn_implementation=name)` can then select it."""
    IMPLEMENTATIONS[name] = Implementation(fn, per_shard)


def implementation_names() -> tuple[str, ...]:
    """Every name `implementation=` accepts: "auto" and the registered implementations."""
    return ("auto", *IMPLEMENTATIONS)


def resolve_implementation(name: str) -> str:
    """Maps "auto" to a concrete implementation for the default backend (the kernels on GPU/TPU, else "xla")."""
    if name == "auto":
        return "pallas" if jax.default_backend() in ("gpu", "tpu") else "xla"
    if name not in IMPLEMENTATIONS:
        raise ValueError(f"implementation={name!r} is not available: choose one of {list(implementation_names())}")
    return name


def _split_axes(mesh, mesh_axes, size: int) -> tuple[str, ...] | None:
    """The mesh axes the rules give a dim, if the mesh has them and together they divide `size` (else None)."""
    axes = tuple(a for a in mesh_axes_of(P(mesh_axes)) if a in mesh.axis_names and mesh.shape[a] > 1)
    return axes if axes and size % math.prod(mesh.shape[a] for a in axes) == 0 else None


def _run_per_shard(fn: GatedDeltaRuleFn, q, k, v, g, beta, initial_state, chunk_size):
    """fn under `jax.shard_map` over the active mesh, batch and heads split by the rules in force; the rule is
    independent across both, so no communication is needed."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return fn(q, k, v, g, beta, initial_state, chunk_size)
    rules = active_rules()
    batch, heads = _split_axes(mesh, rules.get("batch"), q.shape[0]), _split_axes(mesh, rules.get("heads"), q.shape[2])
    sequence, gates, state = P(batch, None, heads, None), P(batch, None, heads), P(batch, heads, None, None)
    return jax.shard_map(
        lambda *args: fn(*args, chunk_size),
        mesh=mesh,
        in_specs=(sequence, sequence, sequence, gates, gates, state),
        out_specs=(sequence, state),
        check_vma=False,
    )(q, k, v, g, beta, initial_state)


def _check_shapes(q, k, v, g, beta, initial_state) -> None:
    if q.ndim != 4:
        raise ValueError(f"q must be (batch, time, heads, d_k), got shape {q.shape}")
    batch, length, heads, d_k = q.shape
    d_v = v.shape[-1] if v.ndim == 4 else None
    expected = {
        "k": (k, (batch, length, heads, d_k)),
        "v": (v, (batch, length, heads, d_v)),
        "g": (g, (batch, length, heads)),
        "beta": (beta, (batch, length, heads)),
    }
    if initial_state is not None:
        expected["initial_state"] = (initial_state, (batch, heads, d_k, d_v))
    for name, (array, shape) in expected.items():
        if array.shape != shape:
            raise ValueError(f"{name} has shape {array.shape}; expected {shape} given q of shape {q.shape}")
    for name, array in dict(q=q, k=k, v=v, g=g, beta=beta).items():
        if not jnp.issubdtype(array.dtype, jnp.floating):
            raise ValueError(f"{name} must be a floating-point array, got dtype {array.dtype}")


def gated_delta_rule(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    g: jax.Array,
    beta: jax.Array,
    initial_state: jax.Array | None = None,
    *,
    implementation: str = "xla",
    chunk_size: int = 64,
) -> tuple[jax.Array, jax.Array]:
    """Gated delta rule over a sequence.

    Args:
      q, k: (B, T, H, d_k). v: (B, T, H, d_v). g: (B, T, H) log decay (alpha = exp(g), g <= 0).
      beta: (B, T, H) write strength in (0, 1). initial_state: (B, H, d_k, d_v), zeros if None.
      implementation: a name of `implementation_names()`. chunk_size: tokens per chunk (chunked forms).
    Returns:
      o (B, T, H, d_v) in q's dtype, and the final state (B, H, d_k, d_v) in float32 (float64 for f64 inputs).
    """
    _check_shapes(q, k, v, g, beta, initial_state)
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size!r} is invalid: must be a positive integer")
    if initial_state is None:
        batch, _, heads, d_k = q.shape
        initial_state = jnp.zeros((batch, heads, d_k, v.shape[-1]), jnp.float32)
    chosen = IMPLEMENTATIONS[resolve_implementation(implementation)]
    if chosen.per_shard:
        return _run_per_shard(chosen.fn, q, k, v, g, beta, initial_state, chunk_size)
    return chosen.fn(q, k, v, g, beta, initial_state, chunk_size)


__all__ = [
    "IMPLEMENTATIONS",
    "Implementation",
    "gated_delta_rule",
    "gated_delta_rule_chunked",
    "gated_delta_rule_reference",
    "implementation_names",
    "register_implementation",
    "resolve_implementation",
    "unit_lower_triangular_inverse",
]
