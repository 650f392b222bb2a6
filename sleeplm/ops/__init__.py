"""The gated delta rule behind one interface: `gated_delta_rule(..., implementation=...)`.

Implementations, all with the signature `(q, k, v, g, beta, initial_state, chunk_size) -> (o, final_state)`:
- "reference": the token-by-token recurrence (`lax.scan`), the ground truth;
- "xla": the chunkwise-parallel form in plain `jax.numpy` (any backend);
- "pallas": the Pallas kernels of `pallas_kernels.gated_delta` (interpret mode on CPU), registered on first use;
- "auto": the fastest available for the default backend ("pallas" on GPU/TPU when registered, else "xla").
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from sleeplm.ops.chunked import gated_delta_rule_chunked, unit_lower_triangular_inverse
from sleeplm.ops.reference import gated_delta_rule_reference

GatedDeltaRuleFn = Callable[..., tuple[jax.Array, jax.Array]]

IMPLEMENTATIONS: dict[str, GatedDeltaRuleFn] = {
    "reference": gated_delta_rule_reference,
    "xla": gated_delta_rule_chunked,
}


def register_implementation(name: str, fn: GatedDeltaRuleFn) -> None:
    """Adds an implementation (used by the Pallas kernels package)."""
    IMPLEMENTATIONS[name] = fn


def _register_pallas() -> None:
    """Registers the Pallas kernels on first use (a separate package: importing sleeplm does not load Pallas)."""
    if "pallas" not in IMPLEMENTATIONS:
        from pallas_kernels.gated_delta import gated_delta_rule_pallas

        register_implementation("pallas", gated_delta_rule_pallas)


def resolve_implementation(name: str) -> str:
    """Maps "auto" to a concrete implementation for the default backend; checks other names."""
    if name in ("auto", "pallas"):
        _register_pallas()
    if name == "auto":
        accelerated = jax.default_backend() in ("gpu", "tpu") and "pallas" in IMPLEMENTATIONS
        return "pallas" if accelerated else "xla"
    if name not in IMPLEMENTATIONS:
        raise ValueError(f"implementation={name!r} is not available: choose one of {sorted(IMPLEMENTATIONS)} or 'auto'")
    return name


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
      implementation: "reference" | "xla" | "pallas" | "auto". chunk_size: tokens per chunk (chunked forms).
    Returns:
      o (B, T, H, d_v) in q's dtype, and the final state (B, H, d_k, d_v) in float32 (float64 for f64 inputs).
    """
    _check_shapes(q, k, v, g, beta, initial_state)
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size!r} is invalid: must be a positive integer")
    if initial_state is None:
        batch, _, heads, d_k = q.shape
        initial_state = jnp.zeros((batch, heads, d_k, v.shape[-1]), jnp.float32)
    fn = IMPLEMENTATIONS[resolve_implementation(implementation)]
    return fn(q, k, v, g, beta, initial_state, chunk_size)


__all__ = [
    "IMPLEMENTATIONS",
    "gated_delta_rule",
    "gated_delta_rule_chunked",
    "gated_delta_rule_reference",
    "register_implementation",
    "resolve_implementation",
    "unit_lower_triangular_inverse",
]
