"""The chunk-local math of the gated delta rule, on one (batch, head) chunk as plain 2-D arrays.

Every kernel body in `kernel.py` is one of these functions applied to the blocks it loads. The backward ones
(`output_vjp`, `wy_vjp`) are written out rather than taken with `jax.vjp`, to visit their operands in column
blocks; tests hold them to autodiff of `output` and of a float64 solve. Shapes: k, q (C, d_k); v, u, v_new
(C, d_v); w (C, d_k); g, beta (C,); state (d_k, d_v). All float32.

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
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax

Precision = lax.Precision | lax.DotAlgorithmPreset
_F32 = jnp.float32
HIGHEST = lax.Precision.HIGHEST
BF16 = "bfloat16"  # a `Dots.data` setting: operands rounded to bfloat16, products accumulated in float32
Contraction = tuple[tuple[int], tuple[int]]


@dataclasses.dataclass(frozen=True)
class Dots:
    """The precision of a kernel's dots. `data`: products of inputs, states and cotangents, a lax precision or BF16
    (flash-linear-attention's choice for bf16 training). `exact`: the decay masks' 0/1 matmuls, whose operands are
    the gates (an error there is amplified by the exponent), and the inverse's doubling product: never below TF32."""

    data: Precision | str = HIGHEST
    exact: Precision = HIGHEST


def _dot_general(a: jax.Array, b: jax.Array, contraction: Contraction, precision: Precision | str) -> jax.Array:
    if precision == BF16:  # a float32 dot of bfloat16-rounded operands
        bf16 = jnp.bfloat16
        return lax.dot_general(a.astype(bf16), b.astype(bf16), (contraction, ((), ())), preferred_element_type=_F32)
    return lax.dot_general(a, b, (contraction, ((), ())), precision=precision)


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


@dataclasses.dataclass(frozen=True)
class ColumnBlocks:
    """(C, d) operands of a kernel that share their columns (K with its cotangent dW, Q with K, ...), visited one
    block of columns at a time so that no whole (C, d) tile of them stays live (whole tiles spill registers on a
    GPU). `spans`: each block's (start, size); `load(start, size)` -> the operands' blocks; `store(start, size,
    *results)` writes the results' blocks (W, or dQ and dK, ...)."""

    spans: tuple[tuple[int, int], ...]
    load: Callable[[int, int], tuple[jax.Array, ...]]
    store: Callable[..., None]


def _dot_nt_over_blocks(blocks: ColumnBlocks, left: int, right: int, dots: Dots) -> jax.Array:
    """A B^T for the operands `left` (A) and `right` (B) of `blocks`, summed over their column blocks."""
    total = 0.0
    for start, size in blocks.spans:
        operands = blocks.load(start, size)
        total += dot_nt(operands[left], operands[right], dots.data)
    return total


def column_spans(width: int, block: int) -> tuple[tuple[int, int], ...]:
    """(start, size) of each block of `block` columns of `width` (one block of all of them unless `block` tiles it)."""
    block = block if 0 < block < width and width % block == 0 else width
    return tuple((start, block) for start in range(0, width, block))


def wy_from_inverse(
    inverse: jax.Array, g: jax.Array, beta: jax.Array, keys: ColumnBlocks, values: ColumnBlocks, dots: Dots = Dots()
) -> None:
    """W = A diag(beta gamma) K and U = A diag(beta) V from the chunk's inverse A = (I + L)^-1, written through
    `keys` (blocks of K; store(W)) and `values` (blocks of V; store(U))."""
    scale_k = beta * jnp.exp(log_decay_from_start(g))
    for side, scale in ((keys, scale_k), (values, beta)):
        for start, size in side.spans:
            side.store(start, size, dot(inverse, scale[:, None] * side.load(start, size)[0], dots.data))


def wy(g: jax.Array, beta: jax.Array, keys: ColumnBlocks, values: ColumnBlocks, dots: Dots = Dots()) -> jax.Array:
    """Stage 1: writes W and U (`wy_from_inverse`) and returns A = (I + L)^-1, L_rs = beta_r Gamma_rs k_r.k_s
    (r > s), by doubling; the backward reuses A instead of recomputing it."""
    gram = _dot_nt_over_blocks(keys, 0, 0, dots)  # K K^T
    rows, cols = _index_grid(g.shape[0])
    lower = jnp.where(rows > cols, beta[:, None] * decay_matrix(g, dots.exact) * gram, 0.0)
    inverse = unit_lower_inverse(lower, dots.exact)
    wy_from_inverse(inverse, g, beta, keys, values, dots)
    return inverse


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
    return _gates_cotangent(d_gram * gram, scale_k * d_rhs_k_dot_k, dots), d_beta


def _gates_cotangent(decay_term: jax.Array, log_gamma_term: jax.Array, dots: Dots) -> jax.Array:
    """dg from the cotangents that reach the decays: Gamma_rs = exp(sum_{s < i <= r} g_i) gives g_i the sum of
    `decay_term` (Gamma's cotangent times Gamma) over r >= i > s, by a 0/1 matmul and a masked column sum as
    `decay_matrix` forms Gamma (no difference of sums); gamma_r = exp(sum_{i <= r} g_i) gives g_i the sum over
    r >= i of `log_gamma_term` (gamma's cotangent times gamma)."""
    rows, cols = _index_grid(decay_term.shape[0])
    past = dot(decay_term, (rows < cols).astype(decay_term.dtype), dots.exact)  # [r, i] = sum_{s < i} F_rs
    return jnp.sum(jnp.where(rows >= cols, past + log_gamma_term[:, None], 0.0), axis=0)


StateBlock = Callable[[tuple[int, int], tuple[int, int]], jax.Array]  # (rows span, columns span) -> a block of S


def _scores(g: jax.Array, queries: ColumnBlocks, dots: Dots) -> tuple[jax.Array, jax.Array]:
    """((Q K^T) o Gamma, Gamma), Q K^T summed over the key-column blocks of `queries` (blocks of Q and K)."""
    decay = decay_matrix(g, dots.exact)
    return _dot_nt_over_blocks(queries, 0, 1, dots) * decay, decay


def output(g: jax.Array, queries: ColumnBlocks, values: ColumnBlocks, state: StateBlock, dots: Dots = Dots()) -> None:
    """Stage 3: O = (gamma Q) S0 + ((Q K^T) o Gamma) V', with S0 the chunk's start state, written through `values`
    (blocks of V'; store(O)) one block of value columns at a time. `queries`: blocks of Q and K; `state(rows,
    cols)` reads a block of S0."""
    gamma = jnp.exp(log_decay_from_start(g))
    scores, _ = _scores(g, queries, dots)
    for v_start, v_size in values.spans:
        out = dot(scores, values.load(v_start, v_size)[0], dots.data)
        for start, size in queries.spans:
            q = queries.load(start, size)[0]
            out += dot(gamma[:, None] * q, state((start, size), (v_start, v_size)), dots.data)
        values.store(v_start, v_size, out)


def output_vjp(
    g: jax.Array,
    queries: ColumnBlocks,
    values: ColumnBlocks,
    state: StateBlock,
    dots: Dots = Dots(),
) -> jax.Array:
    """The backward of `output` for all but the start state (`states_bwd` forms its cotangent): writes dQ, dK
    through `queries` (blocks of Q and K; store(dQ, dK)) and dV' through `values` (blocks of V' and dO; store(dV'))
    and returns dg. `state(rows, cols)` reads a block of the start state. With scores = (Q K^T) o Gamma:

        dscores = dO V'^T      dV' = scores^T dO      dQ = gamma o (dO S^T) + (dscores o Gamma) K
        dK = (dscores o Gamma)^T Q,   Gamma's cotangent times Gamma = dscores o scores

    One pass over the key columns for Q K^T, one over the value columns, and one over the key columns that reads
    each block of S and dO again for dO S^T."""
    gamma = jnp.exp(log_decay_from_start(g))
    scores, decay = _scores(g, queries, dots)
    d_scores = 0.0
    for start, size in values.spans:
        v_new, d_out = values.load(start, size)
        d_scores += dot_nt(d_out, v_new, dots.data)
        values.store(start, size, dot_tn(scores, d_out, dots.data))
    d_decayed_qk = d_scores * decay
    d_log_gamma = 0.0
    for start, size in queries.spans:
        q, k = queries.load(start, size)
        d_decayed_q = 0.0  # (dO S^T) for these key columns
        for v_start, v_size in values.spans:
            d_out = values.load(v_start, v_size)[1]
            d_decayed_q += dot_nt(d_out, state((start, size), (v_start, v_size)), dots.data)
        d_q = gamma[:, None] * d_decayed_q + dot(d_decayed_qk, k, dots.data)
        queries.store(start, size, d_q, dot_tn(d_decayed_qk, q, dots.data))
        d_log_gamma += gamma * jnp.sum(d_decayed_q * q, axis=1)
    return _gates_cotangent(d_scores * scores, d_log_gamma, dots)
