"""`pl.pallas_call`s of the chunked gated delta rule: three forward stages and four backward ones.

Layout: heads are folded into the batch and the sequence is padded to whole chunks before these are called
(`ops.py` does both): q, k (BH, T, d_k); v (BH, T, d_v); g, beta (BH, 1, T) (a row per head:
Mosaic wants the last two block dims (1, C)); states (BH, d_k, d_v), float32.

Forward (docs/method.md, "The gated delta rule in chunks"; the structure of flash-linear-attention's
`chunk_gated_delta_rule`):
  wy      grid (BH, NC), parallel      W, U of each chunk and, for the backward, its A = (I + L)^-1 (`chunk.wy`)
  states  grid (BH, d_v / BV)          a loop over chunks carrying the float32 state on chip: each chunk's start
                                       state, its corrected values V' = U - W S, and the final state
  output  grid (BH, NC), parallel      O = (gamma Q) S + ((Q K^T) o Gamma) V'
Backward: wy_from_inverse (W, U again from the stored A: no doubling product) and states rerun, then in reverse
order output_bwd (parallel; `chunk.output_vjp`, for all but the start state, in column blocks), states_bwd (a
reverse loop over chunks carrying dS, into which it adds the outputs' share (gamma Q)^T dO; it ends as the initial
state's gradient), wy_bwd (parallel; `chunk.wy_vjp`, from the stored A, in column blocks of BV).
The state columns (d_v) are independent, so the sequential kernels split d_v into blocks of BV; their
contributions to dW, dK and dg (which contract over d_v) come back per block and are summed by the caller.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.gated_delta import chunk

_F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """Static kernel parameters: chunk length C, state-column block BV (also the column block in which the parallel
    kernels visit their (C, d) operands, where it tiles them), interpret mode (CPU), the backend compiled for, for
    GPU the Triton launch parameters (warps per program and pipelining stages; None: Triton's), the dot precision
    ("float32", "tf32" or "bfloat16"; `dots`), and `debug`: print each kernel's jaxpr and lowered module (Pallas'
    `debug`; tests count the dots in the Triton modules)."""

    chunk: int
    block_v: int
    interpret: bool
    target: str = "gpu"
    num_warps: int | None = None
    num_stages: int | None = None
    precision: str = "float32"
    debug: bool = False

    @property
    def dots(self) -> chunk.Dots:
        """The dots' precision. "float32": float32-level everywhere, on GPU three TF32 tensor-core products (see
        chunk.py). "tf32": one TF32 product on GPU (GPU only: Mosaic has no three-pass bf16 dot, TF32's TPU
        counterpart, and a CPU computes float32 either way). "bfloat16": the data dots on bfloat16-rounded operands
        (on every backend, the interpreter included), the gates' and the inverse's at TF32 on GPU, else float32."""
        compiled_for_gpu = self.target == "gpu" and not self.interpret
        single, triple = lax.DotAlgorithmPreset.TF32_TF32_F32, lax.DotAlgorithmPreset.TF32_TF32_F32_X3
        if self.precision == "bfloat16":
            return chunk.Dots(chunk.BF16, single if compiled_for_gpu else chunk.HIGHEST)
        if compiled_for_gpu:
            preset = single if self.precision == "tf32" else triple
            return chunk.Dots(preset, preset)
        return chunk.Dots()

    @property
    def stored(self) -> jnp.dtype:
        """The dtype of the intermediates that only dots read, W, A = (I + L)^-1 and the start states, and of V':
        bfloat16 under bfloat16 dots, which round them to it anyway (half the memory traffic), else float32. U
        (read by a subtraction), the carried state and every accumulator stay float32."""
        return jnp.dtype(jnp.bfloat16 if self.precision == "bfloat16" else _F32)


def _load(ref, *index) -> jax.Array:
    return ref[index if index else ...].astype(_F32)


def _load_row(ref, index=slice(None)) -> jax.Array:
    """A per-token vector (g, beta) from its (1, length) block, as a 1-D array."""
    return ref[0, index].astype(_F32)


def _store_row(ref, value: jax.Array) -> None:
    """Stores a per-token vector (dg, dbeta) to row 0 of its (1, length) block."""
    ref[0, :] = value


def _call(kernel, config: KernelConfig, grid, in_specs, out_specs, out_shape):
    compiler_params = None
    if not config.interpret and config.target == "gpu":
        # Triton lowering, chosen explicitly: these kernels use BlockSpecs and in-register tiles, which is what the
        # Triton backend compiles; Mosaic GPU (the default from JAX 0.10) wants warpgroup-level kernels instead.
        compiler_params = pltriton.CompilerParams(num_warps=config.num_warps, num_stages=config.num_stages)
    return pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        interpret=config.interpret,
        compiler_params=compiler_params,
        debug=config.debug,
    )


def _chunk_spec(width: int | None, config: KernelConfig) -> pl.BlockSpec:
    """One chunk of a (BH, T, width) array, or of a per-token (BH, 1, T) array when width is None; grid (BH, NC)."""
    if width is None:
        return pl.BlockSpec((None, 1, config.chunk), lambda bh, n: (bh, 0, n))
    return pl.BlockSpec((None, config.chunk, width), lambda bh, n: (bh, n, 0))


def _chunk_state_spec(d_k: int, d_v: int) -> pl.BlockSpec:
    """Chunk n's start state in the (BH, NC * d_k, d_v) array of start states; grid (BH, NC)."""
    return pl.BlockSpec((None, d_k, d_v), lambda bh, n: (bh, n, 0))


def _sequence_spec(length: int, width: int | None, column_block: bool) -> pl.BlockSpec:
    """The whole sequence of one head (all columns, or the BV-column block j); grid (BH, d_v / BV)."""
    if width is None:
        return pl.BlockSpec((None, 1, length), lambda bh, j: (bh, 0, 0))
    if column_block:
        return pl.BlockSpec((None, length, width), lambda bh, j: (bh, 0, j))
    return pl.BlockSpec((None, length, width), lambda bh, j: (bh, 0, 0))


def _partial_spec(length: int, width: int | None) -> pl.BlockSpec:
    """Block j's partial sum of a quantity that contracts over d_v: arrays (d_v / BV, BH, T, width) or, per token,
    (d_v / BV, BH, 1, T)."""
    if width is None:
        return pl.BlockSpec((None, None, 1, length), lambda bh, j: (j, bh, 0, 0))
    return pl.BlockSpec((None, None, length, width), lambda bh, j: (j, bh, 0, 0))


def _column_blocks(inputs: tuple, outputs: tuple, block: int) -> chunk.ColumnBlocks:
    """(C, d) input refs read, and output refs written, together in blocks of `block` columns (`chunk.ColumnBlocks`)."""

    def load(start, size):
        return tuple(_load(ref, slice(None), pl.ds(start, size)) for ref in inputs)

    def store(start, size, *values):
        for ref, value in zip(outputs, values, strict=True):
            ref[:, pl.ds(start, size)] = value.astype(ref.dtype)

    return chunk.ColumnBlocks(chunk.column_spans(inputs[0].shape[-1], block), load, store)


# ---------------------------------------------------------------------------------------------- stage 1: W, U


def _inverse_spec(config: KernelConfig) -> pl.BlockSpec:
    """Chunk n's inverse (I + L)^-1 in the (BH, T, C) array of them; grid (BH, NC)."""
    return _chunk_spec(config.chunk, config)


def _stage1_specs(d_k: int, d_v: int, config: KernelConfig) -> list[pl.BlockSpec]:
    """k, v, g, beta of one chunk."""
    return [_chunk_spec(d_k, config), _chunk_spec(d_v, config), _chunk_spec(None, config), _chunk_spec(None, config)]


def _wu_outputs(bh: int, length: int, d_k: int, d_v: int, config: KernelConfig) -> tuple[list, list]:
    """Specs and shapes of W (BH, T, d_k) and U (BH, T, d_v)."""
    shapes = [jax.ShapeDtypeStruct((bh, length, d_k), config.stored), jax.ShapeDtypeStruct((bh, length, d_v), _F32)]
    return [_chunk_spec(d_k, config), _chunk_spec(d_v, config)], shapes


def _wu_blocks(k_ref, v_ref, w_ref, u_ref, config: KernelConfig) -> tuple[chunk.ColumnBlocks, chunk.ColumnBlocks]:
    """K read and W written, V read and U written, in column blocks."""
    return _column_blocks((k_ref,), (w_ref,), config.block_v), _column_blocks((v_ref,), (u_ref,), config.block_v)


def _wy_kernel(k_ref, v_ref, g_ref, beta_ref, w_ref, u_ref, *inverse_ref, config: KernelConfig):
    blocks = _wu_blocks(k_ref, v_ref, w_ref, u_ref, config)
    inverse = chunk.wy(_load_row(g_ref), _load_row(beta_ref), *blocks, config.dots)
    if inverse_ref:
        inverse_ref[0][...] = inverse.astype(inverse_ref[0].dtype)


def wy_forward(k, v, g, beta, config: KernelConfig, *, with_inverse: bool = False):
    """-> (W, U), and each chunk's (I + L)^-1 as (BH, T, C) if `with_inverse` (the backward's residual); W and the
    inverses in `config.stored`."""
    (bh, length, d_k), d_v = k.shape, v.shape[-1]
    out_specs, out_shape = _wu_outputs(bh, length, d_k, d_v, config)
    if with_inverse:
        out_specs.append(_inverse_spec(config))
        out_shape.append(jax.ShapeDtypeStruct((bh, length, config.chunk), config.stored))
    return _call(
        functools.partial(_wy_kernel, config=config),
        config,
        (bh, length // config.chunk),
        _stage1_specs(d_k, d_v, config),
        out_specs,
        out_shape,
    )(k, v, g, beta)


def _wy_from_inverse_kernel(inverse_ref, k_ref, v_ref, g_ref, beta_ref, w_ref, u_ref, *, config: KernelConfig):
    blocks = _wu_blocks(k_ref, v_ref, w_ref, u_ref, config)
    chunk.wy_from_inverse(_load(inverse_ref), _load_row(g_ref), _load_row(beta_ref), *blocks, config.dots)


def wy_from_inverse(inverse, k, v, g, beta, config: KernelConfig):
    """-> (W, U) from the stored inverses: the backward's recomputation of stage 1, without the doubling product."""
    (bh, length, d_k), d_v = k.shape, v.shape[-1]
    return _call(
        functools.partial(_wy_from_inverse_kernel, config=config),
        config,
        (bh, length // config.chunk),
        [_inverse_spec(config), *_stage1_specs(d_k, d_v, config)],
        *_wu_outputs(bh, length, d_k, d_v, config),
    )(inverse, k, v, g, beta)


def _wy_bwd_kernel(
    inverse_ref, k_ref, v_ref, g_ref, beta_ref, dw_ref, du_ref, dk_ref, dv_ref, dg_ref, dbeta_ref, *, config
):
    keys = _column_blocks((k_ref, dw_ref), (dk_ref,), config.block_v)
    values = _column_blocks((v_ref, du_ref), (dv_ref,), config.block_v)
    g, beta = _load_row(g_ref), _load_row(beta_ref)
    d_g, d_beta = chunk.wy_vjp(_load(inverse_ref), g, beta, keys, values, config.dots)
    _store_row(dg_ref, d_g)
    _store_row(dbeta_ref, d_beta)


def wy_backward(inverse, k, v, g, beta, dw, du, config: KernelConfig):
    """-> (dK, dV, dg, dbeta) of stage 1, from the stored inverses and the cotangents of W and U."""
    (bh, length, d_k), d_v = k.shape, v.shape[-1]
    specs = _stage1_specs(d_k, d_v, config)
    return _call(
        functools.partial(_wy_bwd_kernel, config=config),
        config,
        (bh, length // config.chunk),
        [_inverse_spec(config), *specs, specs[0], specs[1]],
        specs,
        [jax.ShapeDtypeStruct(x.shape, _F32) for x in (k, v, g, beta)],
    )(inverse, k, v, g, beta, dw, du)


# ------------------------------------------------------------------------------------- stage 2: the state pass


def _states_kernel(
    k_ref, w_ref, u_ref, g_ref, to_end_ref, s0_ref, v_new_ref, states_ref, final_ref, *, size, count, dots
):  # fmt: skip
    d_k = k_ref.shape[-1]

    def step(n, state):  # S_{n+1} = gamma_C S_n + K^T (e o V'), e the decays to the chunk end (ops.decays_to_end)
        rows, state_rows = pl.ds(n * size, size), pl.ds(n * d_k, d_k)
        v_new = _load(u_ref, rows, slice(None)) - chunk.dot(_load(w_ref, rows, slice(None)), state, dots.data)
        states_ref[state_rows, :] = state.astype(states_ref.dtype)
        v_new_ref[rows, :] = v_new.astype(v_new_ref.dtype)
        decayed_v_new = _load_row(to_end_ref, rows)[:, None] * v_new
        chunk_decay = jnp.exp(jnp.sum(_load_row(g_ref, rows)))
        return chunk_decay * state + chunk.dot_tn(_load(k_ref, rows, slice(None)), decayed_v_new, dots.data)

    final_ref[...] = lax.fori_loop(0, count, step, _load(s0_ref))


def states_forward(k, w, u, g, to_end, s0, config: KernelConfig):
    """-> (V' (BH, T, d_v), start states (BH, NC * d_k, d_v), both in `config.stored`, and the float32 final state
    (BH, d_k, d_v)); `to_end` (BH, 1, T) holds each token's decay to its chunk's end."""
    (bh, length, d_k), d_v, bv = k.shape, u.shape[-1], config.block_v
    count = length // config.chunk
    kernel = functools.partial(_states_kernel, size=config.chunk, count=count, dots=config.dots)
    column = pl.BlockSpec((None, d_k, bv), lambda b, j: (b, 0, j))
    keys, row = _sequence_spec(length, d_k, False), _sequence_spec(length, None, False)
    return _call(
        kernel,
        config,
        (bh, d_v // bv),
        [keys, keys, _sequence_spec(length, bv, True), row, row, column],
        [_sequence_spec(length, bv, True), _sequence_spec(count * d_k, bv, True), column],
        [
            jax.ShapeDtypeStruct((bh, length, d_v), config.stored),
            jax.ShapeDtypeStruct((bh, count * d_k, d_v), config.stored),
            jax.ShapeDtypeStruct((bh, d_k, d_v), _F32),
        ],
    )(k, w, u, g, to_end, s0)


def _states_bwd_kernel(
    q_ref, k_ref, w_ref, g_ref, from_start_ref, to_end_ref, v_new_ref, states_ref, dv_new_ref, do_ref, dfinal_ref,
    du_ref, dw_ref, dk_ref, dg_ref, d_to_end_ref, ds0_ref, *, size, count, dots,
):  # fmt: skip
    d_k = k_ref.shape[-1]

    def step(i, d_state):  # d_state: the cotangent of chunk n's end state, S_{n+1}
        n = count - 1 - i
        rows, state_rows = pl.ds(n * size, size), pl.ds(n * d_k, d_k)
        state, k = _load(states_ref, state_rows, slice(None)), _load(k_ref, rows, slice(None))
        v_new, to_end = _load(v_new_ref, rows, slice(None)), _load_row(to_end_ref, rows)
        chunk_decay = jnp.exp(jnp.sum(_load_row(g_ref, rows)))
        d_decayed_v_new = chunk.dot(k, d_state, dots.data)  # of e o V'
        d_v_new = _load(dv_new_ref, rows, slice(None)) + to_end[:, None] * d_decayed_v_new
        dk_ref[rows, :] = chunk.dot_nt(to_end[:, None] * v_new, d_state, dots.data)
        d_to_end_ref[0, rows] = jnp.sum(d_decayed_v_new * v_new, axis=1)
        # d chunk_decay = <S_n, dS>; chunk_decay = exp(sum g): every gate of the chunk gets d chunk_decay * chunk_decay
        d_gates = jnp.sum(jnp.sum(state * d_state, axis=1)) * chunk_decay
        dg_ref[0, rows] = jnp.broadcast_to(d_gates, (size,))
        du_ref[rows, :] = d_v_new
        dw_ref[rows, :] = -chunk.dot_nt(d_v_new, state, dots.data)
        w = _load(w_ref, rows, slice(None))
        # The chunk's outputs read S_n through (gamma Q) S_n: their cotangent of it, formed here, not stored.
        decayed_q = _load_row(from_start_ref, rows)[:, None] * _load(q_ref, rows, slice(None))
        d_state_out = chunk.dot_tn(decayed_q, _load(do_ref, rows, slice(None)), dots.data)
        return chunk_decay * d_state - chunk.dot_tn(w, d_v_new, dots.data) + d_state_out

    ds0_ref[...] = lax.fori_loop(0, count, step, _load(dfinal_ref))


def states_backward(q, k, w, g, from_start, to_end, v_new, states, dv_new, do, dfinal, config: KernelConfig):
    """-> (dU, and the per-BV-block partials of dW, dK, dg, d to_end, and dS0). `dv_new` holds the outputs'
    cotangent of V' (`output_backward`); the outputs' cotangent of each start state, (gamma Q)^T dO, is formed in
    the loop from q, the decays from each chunk's start `from_start` (BH, 1, T) and `do`."""
    (bh, length, d_k), d_v, bv = k.shape, v_new.shape[-1], config.block_v
    count, blocks = length // config.chunk, d_v // bv
    kernel = functools.partial(_states_bwd_kernel, size=config.chunk, count=count, dots=config.dots)
    column = pl.BlockSpec((None, d_k, bv), lambda b, j: (b, 0, j))
    keys, values = _sequence_spec(length, d_k, False), _sequence_spec(length, bv, True)
    row, states_spec = _sequence_spec(length, None, False), _sequence_spec(count * d_k, bv, True)
    key_partial, row_partial = _partial_spec(length, d_k), _partial_spec(length, None)
    return _call(
        kernel,
        config,
        (bh, blocks),
        [keys, keys, keys, row, row, row, values, states_spec, values, values, column],
        [values, key_partial, key_partial, row_partial, row_partial, column],
        [
            jax.ShapeDtypeStruct((bh, length, d_v), _F32),
            jax.ShapeDtypeStruct((blocks, bh, length, d_k), _F32),
            jax.ShapeDtypeStruct((blocks, bh, length, d_k), _F32),
            jax.ShapeDtypeStruct((blocks, bh, 1, length), _F32),
            jax.ShapeDtypeStruct((blocks, bh, 1, length), _F32),
            jax.ShapeDtypeStruct((bh, d_k, d_v), _F32),
        ],
    )(q, k, w, g, from_start, to_end, v_new, states, dv_new, do, dfinal)


# ----------------------------------------------------------------------------------------- stage 3: outputs


def _state_blocks(state_ref) -> chunk.StateBlock:
    """Blocks of a chunk's start state, read as the output kernels need them."""
    return lambda rows, cols: _load(state_ref, pl.ds(*rows), pl.ds(*cols))


def _output_kernel(q_ref, k_ref, g_ref, v_new_ref, state_ref, o_ref, *, config: KernelConfig):
    queries = _column_blocks((q_ref, k_ref), (), config.block_v)
    values = _column_blocks((v_new_ref,), (o_ref,), config.block_v)
    chunk.output(_load_row(g_ref), queries, values, _state_blocks(state_ref), config.dots)


def _output_specs(d_k: int, d_v: int, config: KernelConfig) -> list[pl.BlockSpec]:
    keys, vec = _chunk_spec(d_k, config), _chunk_spec(None, config)
    return [keys, keys, vec, _chunk_spec(d_v, config), _chunk_state_spec(d_k, d_v)]


def output_forward(q, k, g, v_new, states, out_dtype, config: KernelConfig):
    (bh, length, d_k), d_v = q.shape, v_new.shape[-1]
    return _call(
        functools.partial(_output_kernel, config=config),
        config,
        (bh, length // config.chunk),
        _output_specs(d_k, d_v, config),
        _chunk_spec(d_v, config),
        jax.ShapeDtypeStruct((bh, length, d_v), out_dtype),
    )(q, k, g, v_new, states)


def _output_bwd_kernel(
    q_ref, k_ref, g_ref, v_new_ref, state_ref, do_ref, dq_ref, dk_ref, dg_ref, dv_new_ref, *, config: KernelConfig
):
    queries = _column_blocks((q_ref, k_ref), (dq_ref, dk_ref), config.block_v)
    values = _column_blocks((v_new_ref, do_ref), (dv_new_ref,), config.block_v)
    # The start state is read, not differentiated: `states_backward` forms its cotangent.
    _store_row(dg_ref, chunk.output_vjp(_load_row(g_ref), queries, values, _state_blocks(state_ref), config.dots))


def output_backward(q, k, g, v_new, states, do, config: KernelConfig):
    """-> (dQ, dK, dg, dV') of the outputs, each in float32 (the start states' cotangent: `states_backward`)."""
    (bh, length, d_k), d_v = q.shape, v_new.shape[-1]
    specs = _output_specs(d_k, d_v, config)
    return _call(
        functools.partial(_output_bwd_kernel, config=config),
        config,
        (bh, length // config.chunk),
        [*specs, _chunk_spec(d_v, config)],
        specs[:4],
        [jax.ShapeDtypeStruct(x.shape, _F32) for x in (q, k, g, v_new)],
    )(q, k, g, v_new, states, do)
