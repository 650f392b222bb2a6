"""The gated delta rule as its token-by-token recurrence (docs/method.md, "The model"): the ground truth for every
other kernel.

    S_t = alpha_t S_{t-1} + beta_t k_t (v_t - alpha_t S_{t-1}^T k_t)^T,    o_t = S_t^T q_t,    alpha_t = exp(g_t)

Computed in float32 (float64 when the inputs are float64, which the tests use as a gold standard).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from sleeplm.ops.common import compute_dtype

_HIGHEST = lax.Precision.HIGHEST


def gated_delta_rule_reference(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    g: jax.Array,
    beta: jax.Array,
    initial_state: jax.Array,
    chunk_size: int | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Recurrent gated delta rule, `lax.scan` over time. `chunk_size` is accepted for a uniform signature."""
    del chunk_size
    dtype = compute_dtype(q, k, v, g, beta, initial_state)
    time_major = [jnp.moveaxis(x.astype(dtype), 1, 0) for x in (q, k, v, g, beta)]

    def step(state, inputs):
        q_t, k_t, v_t, g_t, beta_t = inputs  # (B, H, d_k) x2, (B, H, d_v), (B, H) x2
        state = jnp.exp(g_t)[..., None, None] * state
        prediction = jnp.einsum("bhkv,bhk->bhv", state, k_t, precision=_HIGHEST)
        state = state + beta_t[..., None, None] * k_t[..., :, None] * (v_t - prediction)[..., None, :]
        out = jnp.einsum("bhkv,bhk->bhv", state, q_t, precision=_HIGHEST)
        return state, out

    final_state, out = lax.scan(step, initial_state.astype(dtype), time_major)
    return jnp.moveaxis(out, 0, 1).astype(q.dtype), final_state
