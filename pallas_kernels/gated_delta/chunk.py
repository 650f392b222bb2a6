"""The chunk-local math of the gated delta rule, on one (batch, head) chunk as plain 2-D arrays.

Every kernel body in `kernel.py` is one of these functions applied to the blocks it loads. The output's backward
differentiates `output` with `jax.vjp` inside the kernel; stage 1's (`wy_vjp`) is written out, to visit its
operands in column blocks, and a test holds it to a float64 solve's autodiff. Shapes: k, q (C, d_k); v, u, v_new (C, d_v); w (C, d_k); g, beta (C,); state (d_k, d_v). All float32.

Every dot takes its precision from the kernel's `Dots`: by default `lax.Precision.HIGHEST` in interpret mode and on
TPU (float32), and on GPU `TF32_TF32_F32_X3` (three TF32 tensor-core products, float32-level accuracy): Triton
compiles a float32 IEEE dot into unrolled FMAs, which made the kernels minutes to compile and slow to run. The
coarser settings (`kernel.KernelConfig.dots`) lower the data dots only, never the gates' or the inverse's below TF32.

Only operations the Triton and Mosaic lowerings support are used: 2-D dots with one contracting dimension,
`iota` masks, row/column reductions, `exp`, `where`. The in-chunk cumulative decays are masked sums and a 0/1
matmul (never the difference of two large cumulative sums), and exponents are masked before `exp`, so strongly
negative gates cost no precision and no positive exponent is ever evaluated.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax

Precision = lax.Precision | lax.DotAlgorithmPreset
_F32 = jnp.float32
HIGHEST = lax.Precision.HIGHEST
BF16 = "bfloat16"  # a `Dots.data` setting: operands rounded to bfloat16, products accumulated in float32
_BF16_UNDER_VJP = "bfloat16 under jax.vjp"  # the same, through a custom_vjp (`Dots.for_vjp`)
Contraction = tuple[tuple[int], tuple[int]]


@dataclasses.dataclass(frozen=True)
class Dots:
    """The precision of a kernel's dots. `data`: products of inputs, states and cotangents, a lax precision or BF16
    (flash-linear-attention's choice for bf16 training). `exact`: the decay masks' 0/1 matmuls, whose operands are
    the gates (an error there is amplified by the exponent), and the inverse's doubling product: never below TF32."""

    data: Precision | str = HIGHEST
    exact: Precision = HIGHEST

    def for_vjp(self) -> Dots:
        """These dots for a function a kernel differentiates with `jax.vjp`: a bfloat16 dot's autodiff transpose
        would pair a float32 cotangent with a bfloat16 operand, which Triton cannot lower, so it goes through a
        custom_vjp instead (which, in turn, Triton lowers only once differentiated: hence not the default)."""
        return dataclasses.replace(self, data=_BF16_UNDER_VJP) if self.data == BF16 else self


def _dot_general(a: jax.Array, b: jax.Array, contraction: Contraction, precision: Precision | str) -> jax.Array:
    if precision == BF16:
        return _bf16_dot(a, b, contraction)
    if precision == _BF16_UNDER_VJP:
        return _differentiable_bf16_dot(a, b, contraction)
    return lax.dot_general(a, b, (contraction, ((), ())), precision=precision)


def _bf16_dot(a: jax.Array, b: jax.Array, contraction: Contraction) -> jax.Array:
    """A float32 dot of bfloat16-rounded operands."""
    bf16 = jnp.bfloat16
    return lax.dot_general(a.astype(bf16), b.astype(bf16), (contraction, ((), ())), preferred_element_type=_F32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _differentiable_bf16_dot(a: jax.Array, b: jax.Array, contraction: Contraction) -> jax.Array:
    """`_bf16_dot`, whose cotangent dots round their operands to bfloat16 too."""
    return _bf16_dot(a, b, contraction)


def _bf16_dot_fwd(a, b, contraction):
    return _bf16_dot(a, b, contraction), (a, b)


def _bf16_dot_bwd(contraction, operands, cotangent):
    """For c = a . b contracting a's axis i with b's axis j (free axes 1 - i and 1 - j): da pairs c with b over b's
    free axis, db pairs a with c over a's, each oriented like its operand without a transpose."""
    a, b = operands
    a_free, b_free = 1 - contraction[0][0], 1 - contraction[1][0]
    d_a = _bf16_dot(cotangent, b, ((1,), (b_free,))) if a_free == 0 else _bf16_dot(b, cotangent, ((b_free,), (1,)))
    d_b = _bf16_dot(a, cotangent, ((a_free,), (0,))) if b_free == 1 else _bf16_dot(cotangent, a, ((0,), (a_free,)))
    return d_a, d_b


_differentiable_bf16_dot.defvjp(_bf16_dot_fwd, _bf16_dot_bwd)


def dot(a: jax.Array, b: jax.Array, precision: Precision | str = HIGHEST) -> jax.Array:
    """a @ b."""
    return _dot_general(a, b, ((1,), (0,)), precision)


def dot_nt(a: jax.Array, b: jax.Array, precision: Precision | str = HIGHEST) -> jax.Array:
    """a @ b.T."""
    return _dot_general(a, b, ((1,), (1,)), precision)


def dot_tn(a: jax.Array, b: jax.Array, precision: Precision | str = HIGHEST) -> jax.Array:
    """a.T @ b."""
    return _dot_general(a, b, ((0,), (0,)), precision)


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


def wy_lower(k: jax.Array, g: jax.Array, beta: jax.Array, dots: Dots = Dots()) -> jax.Array:
    """The strictly lower L_rs = beta_r Gamma_rs k_r.k_s (r > s) of the chunk's system (I + L) [W U] = R."""
    rows, cols = _index_grid(k.shape[0])
    return jnp.where(rows > cols, beta[:, None] * decay_matrix(g, dots.exact) * dot_nt(k, k, dots.data), 0.0)


def wy_rhs(k: jax.Array, v: jax.Array, g: jax.Array, beta: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The right-hand sides R = [diag(beta gamma) K, diag(beta) V], as (R_k, R_v)."""
    gamma = jnp.exp(log_decay_from_start(g))
    return (beta * gamma)[:, None] * k, beta[:, None] * v


def wy_from_inverse(
    inverse: jax.Array, k: jax.Array, v: jax.Array, g: jax.Array, beta: jax.Array, dots: Dots = Dots()
) -> tuple[jax.Array, jax.Array]:
    """W = A R_k and U = A R_v from the chunk's inverse A = (I + L)^-1."""
    rhs_k, rhs_v = wy_rhs(k, v, g, beta)
    return dot(inverse, rhs_k, dots.data), dot(inverse, rhs_v, dots.data)


def wy(
    k: jax.Array, v: jax.Array, g: jax.Array, beta: jax.Array, dots: Dots = Dots()
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Stage 1: (W, U, A), with A = (I + L)^-1 by doubling; the backward reuses A instead of recomputing it."""
    inverse = unit_lower_inverse(wy_lower(k, g, beta, dots), dots.exact)
    return *wy_from_inverse(inverse, k, v, g, beta, dots), inverse


@dataclasses.dataclass(frozen=True)
class ColumnBlocks:
    """One side of stage 1's backward (K with its cotangent dW, or V with dU), visited one block of columns at a
    time so that no whole (C, d) tile of it stays live (whole tiles spill registers on a GPU). `spans`: each
    block's (start, size); `load(start, size)` -> (the input's block, the cotangent's block); `store(start, size,
    gradient)` writes the gradient's block."""

    spans: tuple[tuple[int, int], ...]
    load: Callable[[int, int], tuple[jax.Array, jax.Array]]
    store: Callable[[int, int, jax.Array], None]


def column_spans(width: int, block: int) -> tuple[tuple[int, int], ...]:
    """(start, size) of each block of `block` columns of `width` (one block of all of them unless `block` tiles it)."""
    block = block if 0 < block < width and width % block == 0 else width
    return tuple((start, block) for start in range(0, width, block))


def wy_vjp(
    inverse: jax.Array, g: jax.Array, beta: jax.Array, keys: ColumnBlocks, values: ColumnBlocks, dots: Dots = Dots()
) -> tuple[jax.Array, jax.Array]:
    """The backward of `wy` from its A (no inverse is recomputed): writes dK and dV through `keys` and `values`
    and returns (dg, dbeta). With R = [R_k R_v] = [diag(beta gamma) K, diag(beta) V] and W, U = A R:

        dR = A^T [dW dU]     dA = dW R_k^T + dU R_v^T     dL = -A^T dA A^T (strictly lower: P)
        L = beta o Gamma o (K K^T)  =>  d(K K^T) = beta o Gamma o P =: G,   dK += (G + G^T) K

    and the gates and beta collect what reaches gamma, Gamma and beta. Two passes over the key columns (the first
    accumulates K K^T and dA, the second needs dL) and one over the value columns."""
    gamma = jnp.exp(log_decay_from_start(g))
    scale_k = beta * gamma
    gram = d_inverse = 0.0
    for start, size in keys.spans:
        k, dw = keys.load(start, size)
        gram += dot_nt(k, k, dots.data)
        d_inverse += dot_nt(dw, scale_k[:, None] * k, dots.data)
    d_beta = 0.0
    for start, size in values.spans:  # dV = beta o A^T dU; beta's share of R_v: rowsum(A^T dU o V)
        v, du = values.load(start, size)
        d_inverse += dot_nt(du, beta[:, None] * v, dots.data)
        d_rhs_v = dot_tn(inverse, du, dots.data)
        values.store(start, size, beta[:, None] * d_rhs_v)
        d_beta += jnp.sum(d_rhs_v * v, axis=1)
    rows, cols = _index_grid(g.shape[0])
    d_lower = jnp.where(rows > cols, -dot_nt(dot_tn(inverse, d_inverse, dots.data), inverse, dots.data), 0.0)
    decayed = d_lower * decay_matrix(g, dots.exact)  # P o Gamma
    d_gram = beta[:, None] * decayed
    d_beta += jnp.sum(decayed * gram, axis=1)
    d_rhs_k_dot_k = 0.0
    for start, size in keys.spans:  # dK = beta gamma o A^T dW + (G + G^T) K
        k, dw = keys.load(start, size)
        d_rhs_k = dot_tn(inverse, dw, dots.data)
        keys.store(start, size, scale_k[:, None] * d_rhs_k + dot(d_gram, k, dots.data) + dot_tn(d_gram, k, dots.data))
        d_rhs_k_dot_k += jnp.sum(d_rhs_k * k, axis=1)
    d_beta += gamma * d_rhs_k_dot_k
    # The gates: Gamma_rs = exp(sum_{s < i <= r} g_i) gives g_i the sum of F = G o K K^T over r >= i > s (a 0/1
    # matmul and a masked column sum, as `decay_matrix` forms it: no difference of sums); gamma_r = exp(sum_{i <= r}
    # g_i) gives g_i the sum over r >= i of gamma's cotangent times gamma.
    past = dot(d_gram * gram, (rows < cols).astype(g.dtype), dots.exact)  # [r, i] = sum_{s < i} F_rs
    from_gamma = scale_k * d_rhs_k_dot_k
    d_g = jnp.sum(jnp.where(rows >= cols, past + from_gamma[:, None], 0.0), axis=0)
    return d_g, d_beta


def output(
    q: jax.Array, k: jax.Array, g: jax.Array, v_new: jax.Array, state: jax.Array, dots: Dots = Dots()
) -> jax.Array:
    """Stage 3: O = (gamma Q) S0 + ((Q K^T) o Gamma) V', with S0 the chunk's start state."""
    gamma = jnp.exp(log_decay_from_start(g))
    scores = dot_nt(q, k, dots.data) * decay_matrix(g, dots.exact)
    return dot(gamma[:, None] * q, state, dots.data) + dot(scores, v_new, dots.data)
