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

import functools
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


def _doubling_inverse(strict_lower: jax.Array, precision: Precision) -> jax.Array:
    """(I + L)^-1 for strictly lower-triangular L (C, C) by the doubling product, matmuls only.

    L is nilpotent, so (I + L)^-1 = sum_i (-L)^i = prod_{j < ceil(log2 C)} (I + (-L)^(2^j)).
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


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def unit_lower_inverse(strict_lower: jax.Array, precision: Precision = HIGHEST) -> jax.Array:
    """(I + L)^-1 for strictly lower-triangular L, differentiated in closed form: for A = (I + L)^-1,
    dL = -A^T dA A^T (the caller's mask keeps its strictly lower part), not through the doubling product."""
    return _doubling_inverse(strict_lower, precision)


def _inverse_fwd(strict_lower, precision):
    inverse = _doubling_inverse(strict_lower, precision)
    return inverse, inverse


def _inverse_bwd(precision, inverse, d_inverse):
    return (-dot_nt(dot_tn(inverse, d_inverse, precision), inverse, precision),)


unit_lower_inverse.defvjp(_inverse_fwd, _inverse_bwd)


def wy_inputs(
    k: jax.Array, v: jax.Array, g: jax.Array, beta: jax.Array, precision: Precision = HIGHEST
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The strictly lower L_rs = beta_r Gamma_rs k_r.k_s and the right-hand sides diag(beta) V, diag(beta gamma) K."""
    rows, cols = _index_grid(k.shape[0])
    lower = jnp.where(rows > cols, beta[:, None] * decay_matrix(g, precision) * dot_nt(k, k, precision), 0.0)
    gamma = jnp.exp(log_decay_from_start(g))
    return lower, beta[:, None] * v, (beta * gamma)[:, None] * k


Blocks = tuple[jax.Array, ...]


def wy(
    k: Blocks, v: Blocks, g: Blocks, beta: Blocks, precision: Precision = HIGHEST, inverse=_doubling_inverse
) -> tuple[Blocks, Blocks]:
    """Stage 1: W = (I + L)^-1 diag(beta gamma) K and U = (I + L)^-1 diag(beta) V, by blocked forward substitution.

    The chunk comes as row blocks (k[i] (b, d_k), g[i] (b,), ...; one block is the plain algorithm): block i solves
    (I + L_ii) W_i = R_i - sum_{j<i} L_ij W_j, with (I + L_ii)^-1 by doubling on b x b: the inverses cost
    (C / b) 2 log2(b) b^3 multiply-adds instead of 2 log2(C) C^3, and every dot is b-sized (README.md counts it).
    The coupling L_ij (i > j) has the decay exp(suffix_j[s] + sum of the blocks between + prefix_i[r]):
    two factors with exponents <= 0, never a difference of cumulative sums. `inverse` inverts I + L_ii (`wy_vjp`
    passes the one with the closed-form derivative; Triton cannot lower a `custom_vjp` outside a `jax.vjp`).
    """
    totals = [jnp.sum(block) for block in g]
    tail_decayed_k = [jnp.exp(log_decay_to_end(g_j))[:, None] * k_j for g_j, k_j in zip(g, k, strict=True)]
    w: list[jax.Array] = []
    u: list[jax.Array] = []
    for i in range(len(k)):
        lower, rhs_v, rhs_k = wy_inputs(k[i], v[i], g[i], beta[i], precision)
        rhs_k = jnp.exp(sum(totals[:i], 0.0)) * rhs_k  # gamma from the chunk start, not the block start
        prefix = log_decay_from_start(g[i])
        for j in range(i):
            row_scale = beta[i] * jnp.exp(prefix + sum(totals[j + 1 : i], 0.0))
            coupling = row_scale[:, None] * dot_nt(k[i], tail_decayed_k[j], precision)  # L_ij
            rhs_k = rhs_k - dot(coupling, w[j], precision)
            rhs_v = rhs_v - dot(coupling, u[j], precision)
        block_inverse = inverse(lower, precision)
        w.append(dot(block_inverse, rhs_k, precision))
        u.append(dot(block_inverse, rhs_v, precision))
    return tuple(w), tuple(u)


def wy_vjp(
    k: Blocks, v: Blocks, g: Blocks, beta: Blocks, dw: Blocks, du: Blocks, precision: Precision = HIGHEST
) -> tuple[Blocks, Blocks, Blocks, Blocks]:
    """Cotangents (dk, dv, dg, dbeta) of `wy`, per block; its diagonal inverses have their closed-form derivative."""
    _, pullback = jax.vjp(functools.partial(wy, precision=precision, inverse=unit_lower_inverse), k, v, g, beta)
    return pullback((dw, du))


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
