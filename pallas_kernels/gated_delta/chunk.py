"""The chunk-local math of the gated delta rule, on one (batch, head) chunk as plain 2-D arrays.

Every kernel body in `kernel.py` is one of these functions applied to the blocks it loads, and the backward
kernels differentiate the same functions with `jax.vjp` inside the kernel, so forward and backward cannot drift
apart. Shapes: k, q (C, d_k); v, u, v_new (C, d_v); w (C, d_k); g, beta (C,); state (d_k, d_v). All float32.

Every dot takes the `precision` the kernel was configured with: `lax.Precision.HIGHEST` in interpret mode and on
TPU (float32), and on GPU `TF32_TF32_F32_X3` (three TF32 tensor-core products, float32-level accuracy): Triton
compiles a float32 IEEE dot into unrolled FMAs, which made the kernels minutes to compile and slow to run.

Only operations the Triton and Mosaic lowerings support are used: 2-D dots with one contracting dimension,
`iota` masks, row/column reductions, `exp`, `where`. The in-chunk cumulative decays are masked sums and a 0/1
matmul (never the difference of two large cumulative sums), and exponents are masked before `exp`, so strongly
negative gates cost no precision and no positive exponent is ever evaluated.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax

Precision = lax.Precision | lax.DotAlgorithmPreset
HIGHEST = lax.Precision.HIGHEST


def dot(a: jax.Array, b: jax.Array, precision: Precision = HIGHEST) -> jax.Array:
    """a @ b."""
    return lax.dot_general(a, b, (((1,), (0,)), ((), ())), precision=precision)


def dot_nt(a: jax.Array, b: jax.Array, precision: Precision = HIGHEST) -> jax.Array:
    """a @ b.T."""
    return lax.dot_general(a, b, (((1,), (1,)), ((), ())), precision=precision)


def dot_tn(a: jax.Array, b: jax.Array, precision: Precision = HIGHEST) -> jax.Array:
    """a.T @ b."""
    return lax.dot_general(a, b, (((0,), (0,)), ((), ())), precision=precision)


def _index_grid(size: int) -> tuple[jax.Array, jax.Array]:
    return lax.broadcasted_iota(jnp.int32, (size, size), 0), lax.broadcasted_iota(jnp.int32, (size, size), 1)


def decay_matrix(g: jax.Array, precision: Precision = HIGHEST) -> jax.Array:
    """Gamma[r, s] = exp(sum_{s < i <= r} g_i) for r >= s, else 0."""
    rows, cols = _index_grid(g.shape[0])
    causal = rows >= cols
    # segment[r, s] = sum_i [i <= r] [i > s] g_i as a 0/1 matmul: a sum of same-signed gates, no cancellation.
    segment = dot(causal.astype(g.dtype), jnp.where(rows > cols, g[:, None], 0.0), precision)
    return jnp.where(causal, jnp.exp(jnp.where(causal, segment, 0.0)), 0.0)


def log_decay_from_start(g: jax.Array) -> jax.Array:
    """b_r = sum_{i <= r} g_i, the log decay from the chunk start through token r."""
    rows, cols = _index_grid(g.shape[0])
    return jnp.sum(jnp.where(cols <= rows, g[None, :], 0.0), axis=1)


def log_decay_to_end(g: jax.Array) -> jax.Array:
    """sum_{i > r} g_i, the log decay from token r to the chunk end."""
    rows, cols = _index_grid(g.shape[0])
    return jnp.sum(jnp.where(cols > rows, g[None, :], 0.0), axis=1)


def unit_lower_inverse(strict_lower: jax.Array, precision: Precision = HIGHEST) -> jax.Array:
    """(I + L)^-1 for strictly lower-triangular L (C, C) by the doubling product, matmuls only.

    L is nilpotent, so (I + L)^-1 = sum_i (-L)^i = prod_{j < ceil(log2 C)} (I + (-L)^(2^j)): 2 (ceil(log2 C) - 1)
    C x C products, whole-chunk dots that keep a GPU's tensor cores busy (README.md: a blocked substitution with 4x
    fewer multiply-adds ran 2.1x slower on an H100).
    """
    size = strict_lower.shape[0]
    rows, cols = _index_grid(size)
    eye = (rows == cols).astype(strict_lower.dtype)
    power = -strict_lower
    inverse = eye + power
    for _ in range(1, math.ceil(math.log2(size)) if size > 1 else 0):
        power = dot(power, power, precision)
        inverse = dot(inverse, eye + power, precision)
    return inverse


def wy_lower(k: jax.Array, g: jax.Array, beta: jax.Array, precision: Precision = HIGHEST) -> jax.Array:
    """The strictly lower L_rs = beta_r Gamma_rs k_r.k_s (r > s) of the chunk's system (I + L) [W U] = R."""
    rows, cols = _index_grid(k.shape[0])
    return jnp.where(rows > cols, beta[:, None] * decay_matrix(g, precision) * dot_nt(k, k, precision), 0.0)


def wy_rhs(k: jax.Array, v: jax.Array, g: jax.Array, beta: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The right-hand sides R = [diag(beta gamma) K, diag(beta) V], as (R_k, R_v)."""
    gamma = jnp.exp(log_decay_from_start(g))
    return (beta * gamma)[:, None] * k, beta[:, None] * v


def wy_from_inverse(
    inverse: jax.Array, k: jax.Array, v: jax.Array, g: jax.Array, beta: jax.Array, precision: Precision = HIGHEST
) -> tuple[jax.Array, jax.Array]:
    """W = A R_k and U = A R_v from the chunk's inverse A = (I + L)^-1."""
    rhs_k, rhs_v = wy_rhs(k, v, g, beta)
    return dot(inverse, rhs_k, precision), dot(inverse, rhs_v, precision)


def wy(
    k: jax.Array, v: jax.Array, g: jax.Array, beta: jax.Array, precision: Precision = HIGHEST
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Stage 1: (W, U, A), with A = (I + L)^-1 by doubling; the backward reuses A instead of recomputing it."""
    inverse = unit_lower_inverse(wy_lower(k, g, beta, precision), precision)
    return *wy_from_inverse(inverse, k, v, g, beta, precision), inverse


def wy_vjp(
    inverse: jax.Array,
    k: jax.Array,
    v: jax.Array,
    g: jax.Array,
    beta: jax.Array,
    dw: jax.Array,
    du: jax.Array,
    precision: Precision = HIGHEST,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Cotangents (dk, dv, dg, dbeta) of `wy`'s W and U, given its A (no inverse is recomputed):
    dR = A^T [dW dU], dA = dW R_k^T + dU R_v^T and, from A (I + L) = I, dL = -A^T dA A^T (the pullback of
    `wy_lower` keeps its strictly lower part)."""

    def system(k, v, g, beta):
        return wy_lower(k, g, beta, precision), *wy_rhs(k, v, g, beta)

    (_, rhs_k, rhs_v), pullback = jax.vjp(system, k, v, g, beta)
    d_inverse = dot_nt(dw, rhs_k, precision) + dot_nt(du, rhs_v, precision)
    d_lower = -dot_nt(dot_tn(inverse, d_inverse, precision), inverse, precision)
    return pullback((d_lower, dot_tn(inverse, dw, precision), dot_tn(inverse, du, precision)))


def state_decays(k: jax.Array, g: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Stage 2's decays: K scaled by its decay to the chunk end, and the whole chunk's decay gamma_C."""
    return jnp.exp(log_decay_to_end(g))[:, None] * k, jnp.exp(jnp.sum(g))


def output(
    q: jax.Array, k: jax.Array, g: jax.Array, v_new: jax.Array, state: jax.Array, precision: Precision = HIGHEST
) -> jax.Array:
    """Stage 3: O = (gamma Q) S0 + ((Q K^T) o Gamma) V', with S0 the chunk's start state."""
    gamma = jnp.exp(log_decay_from_start(g))
    scores = dot_nt(q, k, precision) * decay_matrix(g, precision)
    return dot(gamma[:, None] * q, state, precision) + dot(scores, v_new, precision)
