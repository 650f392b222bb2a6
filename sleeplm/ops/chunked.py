"""The gated delta rule in its chunkwise-parallel form, in plain `jax.numpy` (docs/method.md, "The gated delta rule
in chunks").

Per chunk of C tokens, with b the in-chunk cumulative log decay and gamma = exp(b):

    L_rs = beta_r exp(b_r - b_s) k_r.k_s (r > s),  A = (I + L)^-1,  U = A diag(beta) V,  W = A diag(beta gamma) K
    V'   = U - W S0
    O    = (gamma Q) S0 + ((Q K^T) o Gamma o causal) V',      Gamma_rs = exp(b_r - b_s)
    S_C  = gamma_C S0 + (exp(b_C - b) K)^T V'

Three stages, as in flash-linear-attention's `chunk_gated_delta_rule`: (1) intra-chunk WY/UT terms, parallel over
all chunks; (2) the state pass, sequential over chunks (`lax.scan`); (3) outputs, parallel over chunks.

Numerics: everything is float32 (or float64). Decay differences b_r - b_s are formed as sums of the gates between
s and r (a masked cumulative sum), never as the difference of two large cumulative sums, so strongly negative
gates cost no precision; exponents are masked before `exp`, so no positive exponent is ever evaluated. The inverse
of the unit lower-triangular I + L uses matmuls only (see `unit_lower_triangular_inverse`).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

from sleeplm.ops.common import compute_dtype

_mm = functools.partial(jnp.einsum, precision=lax.Precision.HIGHEST)


def _doubling_inverse(strict_lower: jax.Array) -> jax.Array:
    """(I + L)^-1 for strictly lower-triangular L (..., c, c) by the doubling product.

    L is nilpotent (L^c = 0), so (I + L)^-1 = sum_i (-L)^i = prod_{j < ceil(log2 c)} (I + (-L)^(2^j)).
    """
    size = strict_lower.shape[-1]
    eye = jnp.eye(size, dtype=strict_lower.dtype)
    power = -strict_lower
    inverse = eye + power
    for _ in range(1, math.ceil(math.log2(size)) if size > 1 else 0):
        power = _mm("...ij,...jk->...ik", power, power)
        inverse = _mm("...ij,...jk->...ik", inverse, eye + power)
    return inverse


def unit_lower_triangular_inverse(strict_lower: jax.Array, block: int = 16) -> jax.Array:
    """(I + L)^-1 for strictly lower-triangular L (..., C, C), with matmuls only.

    No triangular solve (which has hung inside jitted grad + optimizer steps on CPU with jax 0.10) and no loop over
    rows: the diagonal blocks of size `block` are inverted by the doubling product (2 log2(block) matmuls each,
    all blocks at once), then block rows are filled by forward substitution, A[i, :i] = -A_ii L[i, :i] A[:i, :i].
    For C = 64 this costs about a fifteenth of the doubling product over the whole chunk.
    """
    size = strict_lower.shape[-1]
    if size <= block:
        return _doubling_inverse(strict_lower)
    num_blocks = -(-size // block)
    pad = num_blocks * block - size  # zero rows/columns of L: an identity block in I + L, sliced off at the end
    padded = jnp.pad(strict_lower, [(0, 0)] * (strict_lower.ndim - 2) + [(0, pad), (0, pad)])
    rows = [padded[..., i * block : (i + 1) * block, :] for i in range(num_blocks)]
    diagonal = jnp.stack([rows[i][..., i * block : (i + 1) * block] for i in range(num_blocks)], axis=-3)
    diagonal_inverse = _doubling_inverse(diagonal)  # (..., num_blocks, block, block)

    inverse = diagonal_inverse[..., 0, :, :]  # the leading (i * block)-square of A, grown one block row at a time
    for i in range(1, num_blocks):
        a_ii = diagonal_inverse[..., i, :, :]
        left = -_mm("...ij,...jk,...kl->...il", a_ii, rows[i][..., : i * block], inverse)
        zeros = jnp.zeros((*inverse.shape[:-1], block), inverse.dtype)
        inverse = jnp.concatenate(
            [jnp.concatenate([inverse, zeros], axis=-1), jnp.concatenate([left, a_ii], axis=-1)], axis=-2
        )
    return inverse[..., :size, :size]


def _to_chunks(x: jax.Array, chunk: int) -> jax.Array:
    """(B, T, H, ...) with T a multiple of chunk -> chunk-major (T // chunk, B, H, chunk, ...).

    Chunk-major from the start: the state pass scans over the leading axis with no further transposes.
    """
    batch, length, heads = x.shape[:3]
    x = x.reshape(batch, length // chunk, chunk, heads, *x.shape[3:])
    return jnp.moveaxis(x, (1, 3), (0, 2))


def gated_delta_rule_chunked(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    g: jax.Array,
    beta: jax.Array,
    initial_state: jax.Array,
    chunk_size: int = 64,
) -> tuple[jax.Array, jax.Array]:
    """Chunkwise-parallel gated delta rule; same signature and results as the recurrent reference."""
    dtype = compute_dtype(q, k, v, g, beta, initial_state)
    batch, length, heads, _ = q.shape
    chunk = max(1, min(chunk_size, length))
    pad = -length % chunk
    # Zero padding is a no-op step: g = 0 (alpha = 1) keeps S, beta = 0 writes nothing, q = 0 reads nothing.
    padded = [jnp.pad(x.astype(dtype), [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2)) for x in (q, k, v, g, beta)]
    q_c, k_c, v_c, g_c, beta_c = (_to_chunks(x, chunk) for x in padded)  # (NC, B, H, C[, d])

    causal = jnp.tril(jnp.ones((chunk, chunk), dtype=bool))
    strictly_lower = jnp.tril(jnp.ones((chunk, chunk), dtype=bool), -1)
    # segment[r, s] = sum_{s < i <= r} g_i: the log decay from token s to token r, a sum of same-signed gates
    # (never a difference of two large cumulative sums), as a 0/1 matmul, which XLA runs faster than a cumsum.
    segment = _mm("ri,...is->...rs", causal.astype(dtype), jnp.where(strictly_lower, g_c[..., :, None], 0.0))
    decay = jnp.where(causal, jnp.exp(jnp.where(causal, segment, 0.0)), 0.0)  # Gamma, (..., C, C)
    log_gamma = jnp.cumsum(g_c, axis=-1)  # b_r, from the chunk start, inclusive
    gamma = jnp.exp(log_gamma)
    decay_to_end = jnp.exp(segment[..., -1, :])  # exp(b_C - b_s)
    gamma_end = gamma[..., -1, None, None]

    # Stage 1: intra-chunk WY representation, parallel over (B, H, NC).
    key_gram = _mm("...rk,...sk->...rs", k_c, k_c)
    lower = jnp.where(strictly_lower, beta_c[..., :, None] * decay * key_gram, 0.0)
    inverse = unit_lower_triangular_inverse(lower)
    u = _mm("...rs,...sv->...rv", inverse, beta_c[..., None] * v_c)
    w = _mm("...rs,...sk->...rk", inverse, (beta_c * gamma)[..., None] * k_c)

    # Stage 2: the state pass, sequential over chunks; emits each chunk's start state and corrected values.
    def step(state, xs):
        u_n, w_n, decayed_k_n, gamma_end_n = xs
        new_values = u_n - _mm("bhck,bhkv->bhcv", w_n, state)
        next_state = gamma_end_n * state + _mm("bhck,bhcv->bhkv", decayed_k_n, new_values)
        return next_state, (state, new_values)

    decayed_k = decay_to_end[..., None] * k_c
    xs = (u, w, decayed_k, gamma_end)
    final_state, (start_states, new_values) = lax.scan(step, initial_state.astype(dtype), xs)

    # Stage 3: outputs, parallel over chunks.
    scores = _mm("...rk,...sk->...rs", q_c, k_c) * decay
    out = _mm("...rk,...kv->...rv", gamma[..., None] * q_c, start_states) + _mm(
        "...rs,...sv->...rv", scores, new_values
    )
    out = jnp.moveaxis(out, (0, 2), (1, 3)).reshape(batch, -1, heads, out.shape[-1])[:, :length]
    return out.astype(q.dtype), final_state
