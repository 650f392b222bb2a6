"""The Pallas gated delta rule behind sleeplm's op interface: layout, padding and `custom_vjp`.

`gated_delta_rule_pallas(q, k, v, g, beta, initial_state, chunk_size)` has the signature of every implementation
in `sleeplm.ops` (q, k (B, T, H, d_k); v (B, T, H, d_v); g, beta (B, T, H); state (B, H, d_k, d_v)). It folds heads
into the batch, pads the sequence to whole chunks with no-op tokens (g = 0, beta = 0, q = 0) and, on GPU/TPU, the
head dims to lowering-friendly sizes with zeros (zero key/value columns never touch the rest of the state).

The backward pass keeps the inputs and each chunk's inverse A = (I + L)^-1 (C x C floats per chunk, as
flash-linear-attention keeps it): it recomputes W and U from A (two products, not the doubling product), V' and the
chunk start states with the state kernel (cheap next to storing d_k x d_v per chunk), then runs the three backward
kernels; the start states' cotangents are formed inside the reverse state pass, never stored.

A pallas_call is opaque to GSPMD: `sleeplm.ops` registers this function as a per-shard implementation, so under a
mesh it runs through `jax.shard_map`, batch and heads split as the sharding rules in force say.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels.gated_delta import kernel
from pallas_kernels.gated_delta.kernel import KernelConfig


def _next_power_of_two(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def lowering_sizes(length: int, d_k: int, d_v: int, chunk_size: int, backend: str) -> tuple[int, int, int]:
    """(chunk, padded d_k, padded d_v) for a backend.

    Interpret mode (CPU) takes any sizes. Triton (GPU) needs power-of-two blocks of at least 16 for its dots.
    Mosaic (TPU) needs the last dim of every block in multiples of 128: the head dims, and the chunk too, since g
    and beta are (BH, T) blocks of one chunk; so the chunk is at least 128 there (the result does not depend on it).
    """
    if backend == "cpu":
        return max(1, min(chunk_size, length)), d_k, d_v
    if chunk_size < 16 or chunk_size & (chunk_size - 1):
        raise ValueError(f"chunk_size={chunk_size} is invalid for pallas on {backend}: use a power of two >= 16")
    if backend == "tpu":
        return max(128, chunk_size), -(-d_k // 128) * 128, -(-d_v // 128) * 128
    chunk = min(chunk_size, max(16, _next_power_of_two(length)))
    return chunk, max(16, _next_power_of_two(d_k)), max(16, _next_power_of_two(d_v))


def _value_block(d_v: int, requested: int, backend: str) -> int:
    """The state-column block BV: `requested` if it tiles d_v (on TPU, a multiple of 128 lanes), else all of d_v."""
    if backend == "tpu":
        requested = -(-requested // 128) * 128
    return requested if d_v % requested == 0 else d_v


def decays_to_end(g: jax.Array, chunk: int) -> jax.Array:
    """exp(sum of the gates after each token up to its chunk's end), for folded gates (BH, 1, T): the state pass's
    per-token decays, computed here (differentiable, parallel) so that the sequential kernels only load them.
    A reverse cumulative sum of the (same-signed) gates within each chunk, shifted by one: no difference of sums."""
    batch_heads, _, length = g.shape
    chunks = g.reshape(batch_heads, length // chunk, chunk)
    from_each_on = jnp.flip(jnp.cumsum(jnp.flip(chunks, -1), axis=-1), -1)  # sum_{i >= r}
    after_each = jnp.pad(from_each_on[..., 1:], [(0, 0), (0, 0), (0, 1)])  # sum_{i > r}
    return jnp.exp(after_each).reshape(batch_heads, 1, length)


def decays_from_start(g: jax.Array, chunk: int) -> jax.Array:
    """exp(sum of the gates from each token's chunk start through it), for folded gates (BH, 1, T): gamma, which
    the backward's state pass needs to form the outputs' cotangent of each start state, (gamma Q)^T dO."""
    batch_heads, _, length = g.shape
    through_each = jnp.cumsum(g.reshape(batch_heads, length // chunk, chunk), axis=-1)
    return jnp.exp(through_each).reshape(batch_heads, 1, length)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8))
def _folded(q, k, v, g, beta, to_end, s0, config: KernelConfig, out_dtype):
    """The rule on folded, padded inputs: q, k (BH, T, d_k); v (BH, T, d_v); g, beta and the decays to the chunk
    ends (BH, 1, T); s0 (BH, d_k, d_v). Without differentiation the inverses are not written."""
    return _forward(q, k, v, g, beta, to_end, s0, config, out_dtype, with_inverse=False)


def _forward(q, k, v, g, beta, to_end, s0, config, out_dtype, with_inverse):
    """The three forward stages -> (o, final state, and each chunk's inverse if `with_inverse`)."""
    w, u, *inverse = kernel.wy_forward(k, v, g, beta, config, with_inverse=with_inverse)
    v_new, states, final = kernel.states_forward(k, w, u, g, to_end, s0, config)
    return kernel.output_forward(q, k, g, v_new, states, out_dtype, config), final, *inverse


def _folded_fwd(q, k, v, g, beta, to_end, s0, config, out_dtype):
    out, final, inverse = _forward(q, k, v, g, beta, to_end, s0, config, out_dtype, with_inverse=True)
    return (out, final), (q, k, v, g, beta, to_end, s0, inverse)


def _folded_bwd(config, out_dtype, residuals, cotangents):
    del out_dtype
    q, k, v, g, beta, to_end, s0, inverse = residuals
    d_out, d_final = cotangents
    w, u = kernel.wy_from_inverse(inverse, k, v, g, beta, config)  # recomputed, not stored
    v_new, states, _ = kernel.states_forward(k, w, u, g, to_end, s0, config)
    dq, dk_out, dg_out, dv_new = kernel.output_backward(q, k, g, v_new, states, d_out, config)
    from_start = decays_from_start(g.astype(jnp.float32), config.chunk)
    du, dw, dk_state, dg_state, d_to_end, ds0 = kernel.states_backward(
        q, k, w, g, from_start, to_end, v_new, states, dv_new, d_out, d_final.astype(jnp.float32), config
    )
    dk_wy, dv, dg_wy, dbeta = kernel.wy_backward(inverse, k, v, g, beta, dw.sum(0), du, config)
    dk = dk_out + dk_state.sum(0) + dk_wy
    grads = (dq, dk, dv, dg_out + dg_state.sum(0) + dg_wy, dbeta, d_to_end.sum(0), ds0)
    return tuple(grad.astype(x.dtype) for grad, x in zip(grads, residuals[:7], strict=True))


_folded.defvjp(_folded_fwd, _folded_bwd)


def _fold(x: jax.Array, length: int, width: int | None) -> jax.Array:
    """(B, T, H, d) -> (B * H, length, width), or per token (B, T, H) -> (B * H, 1, length); zero-padded at the
    end of time and of the last dim."""
    batch, time, heads = x.shape[:3]
    x = jnp.moveaxis(x, 2, 1).reshape(batch * heads, time, *x.shape[3:])
    if width is None:
        return jnp.pad(x, [(0, 0), (0, length - time)])[:, None, :]
    return jnp.pad(x, [(0, 0), (0, length - time), (0, width - x.shape[-1])])


def fold_inputs(
    q, k, v, g, beta, initial_state, chunk_size, interpret, block_v, layout, num_warps, num_stages, precision
) -> tuple[tuple[jax.Array, ...], KernelConfig]:
    """The kernels' inputs (heads folded into the batch, time padded to whole chunks, head dims padded for the
    backend) and their static config; `bench.py` times each stage on these."""
    batch, length, heads, d_k = q.shape
    d_v = v.shape[-1]
    chunk, d_k_pad, d_v_pad = lowering_sizes(length, d_k, d_v, chunk_size, layout)
    padded_length = -(-length // chunk) * chunk
    config = KernelConfig(
        chunk=chunk,
        block_v=_value_block(d_v_pad, block_v, layout),
        interpret=interpret,
        target=layout,
        num_warps=num_warps,
        num_stages=num_stages,
        precision=_dot_precision(precision, q.dtype),
    )
    s0 = initial_state.astype(jnp.float32).reshape(batch * heads, d_k, d_v)
    s0 = jnp.pad(s0, [(0, 0), (0, d_k_pad - d_k), (0, d_v_pad - d_v)])
    gates = _fold(g, padded_length, None)
    folded = (
        _fold(q, padded_length, d_k_pad),
        _fold(k, padded_length, d_k_pad),
        _fold(v, padded_length, d_v_pad),
        gates,
        _fold(beta, padded_length, None),
        decays_to_end(gates.astype(jnp.float32), chunk),
        s0,
    )
    return folded, config


def _dot_precision(precision: str, input_dtype) -> str:
    """The kernels' dot precision: as asked, or for "auto" "tf32" with 16-bit inputs (whose own rounding, ~4e-3, is
    larger than single-pass TF32's error on an H100, ~4e-4) and "float32" otherwise."""
    if precision not in ("auto", "float32", "tf32", "bfloat16"):
        raise ValueError(f"precision={precision!r} is invalid: choose 'auto', 'float32', 'tf32' or 'bfloat16'")
    if precision == "auto":
        return "tf32" if jnp.dtype(input_dtype).itemsize < 4 else "float32"
    return precision


def _gated_delta_rule_local(q, k, v, g, beta, initial_state, **settings):
    batch, length, heads, d_k = q.shape
    d_v = v.shape[-1]
    folded, config = fold_inputs(q, k, v, g, beta, initial_state, **settings)
    out, final = _folded(*folded, config, q.dtype)
    out = jnp.moveaxis(out[:, :length, :d_v].reshape(batch, heads, length, d_v), 1, 2)
    return out, final[:, :d_k, :d_v].reshape(batch, heads, d_k, d_v)


def gated_delta_rule_pallas(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    g: jax.Array,
    beta: jax.Array,
    initial_state: jax.Array,
    chunk_size: int = 64,
    *,
    interpret: bool | None = None,
    block_v: int = 64,
    layout: str | None = None,
    num_warps: int | None = None,
    num_stages: int | None = 1,
    precision: str = "auto",
) -> tuple[jax.Array, jax.Array]:
    """Chunked gated delta rule in Pallas kernels; same signature and results as `sleeplm.ops`' reference.

    `interpret` defaults to True on CPU (the same kernels, run by the Pallas interpreter) and False elsewhere.
    `block_v` is the state-column block of the sequential kernels and the column block of the parallel ones.
    `layout` names the backend whose block-size constraints (chunk and head-dim padding, `lowering_sizes`) to
    apply: by default "cpu" when interpreting (no padding), else the running backend; tests pass "gpu" in
    interpret mode to check the padded path.
    `num_warps`, `num_stages`: Triton launch parameters on GPU (None: Triton's defaults). One stage (no software
    pipelining) by default: with Triton's three, the sequential kernels' loads asked an H200 for 279 KB of shared
    memory (it has 227 KB).
    `precision`: "float32" (every dot float32-level: three TF32 tensor-core products on GPU), "tf32" (one TF32
    product per dot on GPU: relative errors near 4e-4, 2.8x faster on an H100; no change on TPU and CPU),
    "bfloat16" (products of inputs, states and cotangents on bfloat16-rounded operands with float32 accumulation,
    as flash-linear-attention computes; the gates' and the inverse's dots stay at TF32 or better; on every backend;
    not yet timed on a GPU), or "auto" (the default): "tf32" for 16-bit inputs, "float32" otherwise.
    Accumulates and stores in float32 whatever the input dtype; returns o in q's dtype and the final state in
    float32.
    """
    if interpret is None:
        interpret = jax.default_backend() == "cpu"
    if layout is None:
        layout = "cpu" if interpret else jax.default_backend()
    if layout not in ("cpu", "gpu", "tpu"):
        raise ValueError(f"layout={layout!r} is invalid: choose 'cpu', 'gpu' or 'tpu'")
    return _gated_delta_rule_local(
        q,
        k,
        v,
        g,
        beta,
        initial_state,
        chunk_size=chunk_size,
        interpret=interpret,
        block_v=block_v,
        layout=layout,
        num_warps=num_warps,
        num_stages=num_stages,
        precision=precision,
    )
