"""Pallas-specific checks (interpret mode on CPU): the padded GPU/TPU layouts, split state-column blocks, lowering
for GPU and TPU, the dispatcher, and a tiny model trained through the kernels. The shared correctness tests
(outputs, final state, all six gradients, corner cases, continuation) run "pallas" beside the other implementations
in test_ops.py."""

from __future__ import annotations

import dataclasses
import functools
import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import numpy_gated_delta_rule, random_gdr_inputs, relative_error
from test_ops import ARG_NAMES

from pallas_kernels.gated_delta import chunk, gated_delta_rule_pallas, kernel, lowering_sizes
from pallas_kernels.gated_delta.lowered import dot_macs, triton_modules
from pallas_kernels.gated_delta.ops import fold_inputs
from sleeplm import Config, ModelConfig, SleepConfig
from sleeplm.data import Rule110Config, batched, make_source
from sleeplm.experiment.schema import TrainConfig
from sleeplm.ops import IMPLEMENTATIONS, gated_delta_rule, resolve_implementation
from sleeplm.training.step import init_train_state, train_step

ROOT = Path(__file__).resolve().parents[1]
GPU = ("cuda", "gpu", "__gpu$xla.gpu.triton")  # (export platform, layout, the kernels' custom call)
TPU = ("tpu", "tpu", "tpu_custom_call")


def _value_and_grads(inputs, fn):
    rng = np.random.default_rng(5)
    cotangent = rng.normal(size=inputs["v"].shape).astype(np.float32)
    state_cotangent = rng.normal(size=inputs["initial_state"].shape).astype(np.float32)

    def loss(*args):
        out, state = fn(*args)
        return jnp.sum(out * cotangent) + jnp.sum(state * state_cotangent), (out, state)

    args = [jnp.asarray(inputs[name]) for name in ARG_NAMES]
    (_, outputs), grads = jax.value_and_grad(loss, argnums=tuple(range(6)), has_aux=True)(*args)
    return outputs, grads


def _errors_against_reference(inputs, fn) -> dict[str, float]:
    """Relative error of `fn`'s outputs, final state and six gradients against the recurrent reference's."""
    actual = _value_and_grads(inputs, fn)
    expected = _value_and_grads(inputs, lambda *a: gated_delta_rule(*a, implementation="reference"))
    pairs = zip(("out", "state", *ARG_NAMES), (*actual[0], *actual[1]), (*expected[0], *expected[1]), strict=True)
    errors = {}
    for name, a, b in pairs:
        assert a.shape == b.shape, name
        errors[name] = relative_error(a, b)
    return errors


@pytest.mark.parametrize(
    ("layout", "d_k", "d_v", "block_v"),
    [
        ("gpu", 12, 24, 16),  # head dims padded to 16 and 32; two state-column blocks; chunk a power of two
        ("gpu", 24, 12, 32),  # d_k > d_v, padded to 32 and 16; one state-column block
        ("tpu", 8, 8, 64),  # head dims padded to 128, chunk 128
        ("cpu", 16, 8, 4),  # no padding; two state-column blocks whose dW, dK, dg partials are summed
    ],
)
def test_padded_layouts_and_blocks_match_the_reference(layout, d_k, d_v, block_v):
    inputs = random_gdr_inputs(7, batch=1, length=37, heads=2, d_k=d_k, d_v=d_v)
    settings = dict(interpret=True, block_v=block_v, layout=layout)
    errors = _errors_against_reference(inputs, lambda *a: gated_delta_rule_pallas(*a, 16, **settings))
    for name, error in errors.items():
        assert error < 1e-5, name


def _stage1_float64(k, v, g, beta):
    """W, U and A = (I + L)^-1 by a float64 solve, with L's decays as differences of float64 cumulative gate sums
    (exact enough in float64, and not how the kernels form them)."""
    size = k.shape[0]
    cumulative = jnp.cumsum(g)
    decays = jnp.exp(jnp.tril(cumulative[:, None] - cumulative[None, :], -1))
    system = jnp.eye(size) + jnp.tril(beta[:, None] * decays * (k @ k.T), -1)
    rhs = jnp.concatenate([(beta * jnp.exp(cumulative))[:, None] * k, beta[:, None] * v], axis=1)
    solution = jnp.linalg.solve(system, rhs)
    return solution[:, : k.shape[1]], solution[:, k.shape[1] :], jnp.linalg.inv(system)


def _blocks(written: dict, name: str, block: int, *arrays) -> chunk.ColumnBlocks:
    """`chunk.ColumnBlocks` over whole arrays: loads their column blocks, keeps what is stored in `written[name]`."""
    store = lambda start, size, *grads: written.setdefault(name, []).append((start, grads))
    load = lambda start, size: tuple(x[:, start : start + size] for x in arrays)
    return chunk.ColumnBlocks(chunk.column_spans(arrays[0].shape[1], block), load, store)


def _joined(written: dict, name: str, index: int = 0) -> jax.Array:
    """The `index`-th gradient stored under `name`, its column blocks joined in order."""
    return jnp.concatenate([grads[index] for _, grads in sorted(written[name], key=lambda w: w[0])], axis=1)


@pytest.mark.parametrize(
    ("size", "gate_scale", "block"), [(64, 1.0, 4), (64, 40.0, 4), (13, 1.0, 6), (1, 1.0, 4), (16, 1.0, 64)]
)
def test_stage1_and_its_backward_match_a_float64_solve(size, gate_scale, block):
    """`chunk.wy` (W, U and the inverse, by doubling) and `chunk.wy_vjp` (the closed-form backward from the stored
    inverse), both in column blocks as the kernels run them (4 splits keys (8 wide) and values (12), 6 the values
    only, 64 neither), against a float64 solve and its autodiff; gate_scale 40 makes decays across the chunk
    underflow."""
    rng = np.random.default_rng(size)
    k = rng.normal(size=(size, 8)) / np.sqrt(8)
    v, g, beta = rng.normal(size=(size, 12)), -gate_scale * rng.uniform(size=size), rng.uniform(size=size)
    dw, du = rng.normal(size=(size, 8)), rng.normal(size=(size, 12))
    with jax.enable_x64(True):
        inputs64 = [jnp.asarray(x, jnp.float64) for x in (k, v, g, beta)]
        (w64, u64, inverse64), pullback = jax.vjp(_stage1_float64, *inputs64)
        grads64 = pullback((jnp.asarray(dw), jnp.asarray(du), jnp.zeros((size, size))))
    (k, v, g, beta), written = (jnp.asarray(x, jnp.float32) for x in (k, v, g, beta)), {}
    inverse = chunk.wy(g, beta, _blocks(written, "w", block, k), _blocks(written, "u", block, v))
    w, u = _joined(written, "w"), _joined(written, "u")
    for actual, expected in zip((w, u, inverse), (w64, u64, inverse64), strict=True):
        assert relative_error(actual, expected) < 1e-6
    (dw, du), written = (jnp.asarray(x, jnp.float32) for x in (dw, du)), {}
    keys, values = _blocks(written, "k", block, k, dw), _blocks(written, "v", block, v, du)
    dg, dbeta = chunk.wy_vjp(inverse, g, beta, keys, values)
    grads = (_joined(written, "k"), _joined(written, "v"), dg, dbeta)
    for name, actual, expected in zip(("dk", "dv", "dg", "dbeta"), grads, grads64, strict=True):
        assert relative_error(actual, expected) < 1e-5, name


def _state_block(state: jax.Array) -> chunk.StateBlock:
    return lambda rows, cols: state[rows[0] : rows[0] + rows[1], cols[0] : cols[0] + cols[1]]


def _output_on_arrays(q, k, g, v_new, state, block):
    """`chunk.output` on whole arrays, in column blocks."""
    written = {}
    chunk.output(g, _blocks(written, "qk", block, q, k), _blocks(written, "o", block, v_new), _state_block(state))
    return _joined(written, "o")


def _output_float64(q, k, g, v_new, state):
    """O = (gamma Q) S0 + ((Q K^T) o Gamma) V' in float64, Gamma and gamma from differences of cumulative sums."""
    cumulative, causal = jnp.cumsum(g), jnp.tri(g.shape[0], dtype=bool)
    decays = jnp.where(causal, jnp.exp(jnp.where(causal, cumulative[:, None] - cumulative[None, :], 0.0)), 0.0)
    return (jnp.exp(cumulative)[:, None] * q) @ state + ((q @ k.T) * decays) @ v_new


@pytest.mark.parametrize(("size", "gate_scale", "block"), [(64, 1.0, 4), (64, 40.0, 4), (13, 1.0, 6), (1, 1.0, 64)])
def test_output_and_its_backward_match_float64(size, gate_scale, block):
    """`chunk.output` and `chunk.output_vjp` (written out), both in column blocks as the kernels run them (4 splits
    keys (8 wide) and values (12), 6 the values only, 64 neither), against a float64 formula and its autodiff."""
    rng = np.random.default_rng(size)
    q, k = rng.normal(size=(size, 8)) / np.sqrt(8), rng.normal(size=(size, 8)) / np.sqrt(8)
    g, v_new, d_out = -gate_scale * rng.uniform(size=size), rng.normal(size=(size, 12)), rng.normal(size=(size, 12))
    state = rng.normal(size=(8, 12))
    with jax.enable_x64(True):
        out64, pullback = jax.vjp(_output_float64, *(jnp.asarray(x, jnp.float64) for x in (q, k, g, v_new, state)))
        dq64, dk64, dg64, dv64, _ = pullback(jnp.asarray(d_out))
    q, k, g, v_new, state, d_out = (jnp.asarray(x, jnp.float32) for x in (q, k, g, v_new, state, d_out))
    assert relative_error(_output_on_arrays(q, k, g, v_new, state, block), out64) < 1e-6
    written = {}
    queries, values = _blocks(written, "qk", block, q, k), _blocks(written, "v", block, v_new, d_out)
    dg = chunk.output_vjp(g, queries, values, _state_block(state))
    grads = (_joined(written, "qk", 0), _joined(written, "qk", 1), dg, _joined(written, "v"))
    for name, actual, expected in zip(("dq", "dk", "dg", "dv_new"), grads, (dq64, dk64, dg64, dv64), strict=True):
        assert relative_error(actual, expected) < 1e-5, name


def test_lowering_sizes():
    assert lowering_sizes(37, 12, 24, 7, "cpu") == (7, 12, 24)
    assert lowering_sizes(5, 12, 24, 64, "cpu") == (5, 12, 24)
    assert lowering_sizes(5, 12, 24, 64, "gpu") == (16, 16, 32)
    assert lowering_sizes(4096, 128, 128, 64, "gpu") == (64, 128, 128)
    assert lowering_sizes(4096, 64, 200, 64, "tpu") == (128, 128, 256)
    with pytest.raises(ValueError, match=r"chunk_size=24 is invalid for pallas on gpu"):
        lowering_sizes(100, 16, 16, 24, "gpu")


@functools.cache  # the default settings' module is compared against by several tests
def _exported_module(platform: str, layout: str, custom_call: str, dtype, **settings) -> str:
    """Value and gradients exported for `platform` through `jax.export`, as MLIR text without source locations."""
    batch, length, heads, d = 1, 300, 2, 96  # padded in time and head dims
    args = [
        jax.ShapeDtypeStruct(shape, dtype) for shape in [(batch, length, heads, d)] * 3 + [(batch, length, heads)] * 2
    ]
    args.append(jax.ShapeDtypeStruct((batch, heads, d, d), jnp.float32))

    def loss(*inputs):
        out, state = gated_delta_rule_pallas(*inputs, 64, interpret=False, layout=layout, **settings)
        return jnp.sum(out.astype(jnp.float32)) + jnp.sum(state)

    exported = jax.export.export(
        jax.jit(jax.value_and_grad(loss, argnums=tuple(range(6)))),
        platforms=[platform],
        disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(custom_call)],
    )(*args)
    return "\n".join(line for line in exported.mlir_module().splitlines() if not line.startswith("#loc"))


@pytest.mark.parametrize(
    ("platform", "layout", "custom_call"),
    [GPU, TPU],
)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_forward_and_backward_lower_for_gpu_and_tpu(platform, layout, custom_call, dtype):
    """Lowers value and gradients for GPU (Triton) and TPU (Mosaic) on this CPU-only machine, through `jax.export`:
    every block shape and every primitive in the kernel bodies must pass Pallas' lowering rules for that backend.
    (Compiling the lowered kernels to machine code needs the device; bench.py checks that on a GPU.)"""
    # Forward: wy, states, output. Backward: W, U from the stored inverses and states recomputed, then output_bwd,
    # states_bwd, wy_bwd.
    assert _exported_module(platform, layout, custom_call, dtype).count(f"@{custom_call}(") == 8


@pytest.mark.parametrize(
    ("backend", "dtype", "setting", "same_as_default"),
    [
        (GPU, jnp.float32, {"precision": "tf32"}, False),  # "auto" gives float32 inputs three-pass dots ...
        (GPU, jnp.bfloat16, {"precision": "float32"}, False),  # ... and 16-bit inputs single-pass ones
        (GPU, jnp.bfloat16, {"precision": "tf32"}, True),
        (GPU, jnp.bfloat16, {"precision": "bfloat16"}, False),
        (TPU, jnp.float32, {"precision": "bfloat16"}, False),  # bfloat16 dots are TPU's native ones
        (TPU, jnp.float32, {"precision": "tf32"}, True),  # Mosaic has no TF32
    ],
)
def test_dot_precisions_lower(backend, dtype, setting, same_as_default):
    module = _exported_module(*backend, dtype, **setting)
    assert module.count(f"@{backend[2]}(") == 8
    assert (module == _exported_module(*backend, dtype)) == same_as_default


@pytest.mark.parametrize(
    ("gate_scale", "length"),
    [(0.02, 128), pytest.param(40.0, 48, marks=pytest.mark.slow)],  # long memory over 8 chunks; strong decay
)
def test_bfloat16_dots_err_like_bfloat16_rounding(gate_scale, length):
    """precision="bfloat16" rounds the data dots' operands (in interpret mode as on a device): every output and
    gradient within 1e-2 of the recurrence (bf16's unit roundoff is 3.9e-3), and not float32-close (it took effect)."""
    inputs = random_gdr_inputs(3, batch=1, length=length, heads=2, d_k=32, d_v=16, gate_scale=gate_scale)
    errors = _errors_against_reference(inputs, lambda *a: gated_delta_rule_pallas(*a, 16, precision="bfloat16"))
    for name, error in errors.items():
        assert 1e-4 < error < 1e-2, name


def test_bfloat16_dots_store_what_they_round_anyway_in_bfloat16():
    """Under precision="bfloat16", W, the inverses, V' and the start states are written in bfloat16 (half the memory
    traffic); U, which a subtraction reads, and the final state stay float32, as everything does otherwise."""
    inputs = random_gdr_inputs(4, batch=1, length=32, heads=1, d_k=16, d_v=16)
    settings = dict(chunk_size=16, interpret=True, block_v=16, layout="cpu", num_warps=None, num_stages=None)
    dtypes = {}
    for precision in ("float32", "bfloat16"):
        folded, config = fold_inputs(*(jnp.asarray(inputs[n]) for n in ARG_NAMES), **settings, precision=precision)
        _, k, v, g, beta, to_end, s0 = folded
        w, u, inverse = kernel.wy_forward(k, v, g, beta, config, with_inverse=True)
        v_new, states, final = kernel.states_forward(k, w, u, g, to_end, s0, config)
        dtypes[precision] = [x.dtype for x in (w, inverse, v_new, states, u, final)]
    assert dtypes["float32"] == [jnp.float32] * 6
    assert dtypes["bfloat16"] == [jnp.bfloat16] * 4 + [jnp.float32] * 2


def test_dispatcher_runs_pallas_and_auto_picks_xla_on_cpu(gdr_inputs):
    assert resolve_implementation("auto") == "xla"  # this machine has no accelerator
    assert "pallas" in IMPLEMENTATIONS
    out, state = gated_delta_rule(**gdr_inputs, implementation="pallas", chunk_size=16)
    expected_out, expected_state = numpy_gated_delta_rule(**gdr_inputs)
    assert relative_error(out, expected_out) < 2e-6 and relative_error(state, expected_state) < 2e-6
    with pytest.raises(ValueError, match=r"layout='cuda' is invalid"):
        gated_delta_rule_pallas(*(gdr_inputs[n] for n in ARG_NAMES), layout="cuda")
    with pytest.raises(ValueError, match=r"precision='bf16' is invalid: choose 'auto', 'float32', 'tf32' or 'bf"):
        gated_delta_rule_pallas(*(gdr_inputs[n] for n in ARG_NAMES), 16, precision="bf16")


@pytest.mark.slow  # about 35 s of interpret-mode kernels; CI runs it in make test-slow
def test_tiny_model_trains_the_same_through_the_kernels():
    task = Rule110Config(width=8, num_strings=2, steps=1, window=8)
    source = make_source(task, "train", seed=0, size=16)
    model = ModelConfig(vocab_size=len(source.vocab), d_model=32, layers=("attn", "gdn"), num_heads=2, mlp_dim=64)
    train = TrainConfig(steps=3, batch_size=8, warmup_steps=1, muon_lr=2e-2, adam_lr=1e-2)
    batch = jax.tree.map(jnp.asarray, batched(source, 8, seed=0)[0])
    losses = {}
    for implementation in ("xla", "pallas"):
        config = Config(
            dataclasses.replace(model, gdn_implementation=implementation, gdn_chunk_size=4),
            SleepConfig(window=8, passes=2),
        )
        state = init_train_state(jax.random.key(0), config, train)
        losses[implementation] = []
        for _ in range(train.steps):  # one fixed batch: the loss must fall
            state, metrics = train_step(state, batch, config, train)
            losses[implementation].append(float(metrics["loss"]))
    np.testing.assert_allclose(losses["pallas"], losses["xla"], rtol=1e-5)
    assert losses["xla"][-1] < losses["xla"][0]


@pytest.mark.slow  # about a minute: every section of the GPU script, interpreted at a tiny shape
def test_the_gpu_benchmark_script_runs_every_section_on_cpu(tmp_path):
    """A dry run of bench.py, so that the script a lent GPU runs is known to work end to end: every section writes
    its results, the kernels agree with the recurrence, and the stage times add up to at most the whole."""
    out = tmp_path / "bench.json"
    command = [sys.executable, "-m", "pallas_kernels.gated_delta.bench", "--batch", "1", "--length", "128"]
    command += ["--heads", "2", "--dim", "32", "--chunk", "16", "--repeats", "1", "--out", str(out)]
    command += ["--sections", "timing,stages,correctness,sweep"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False, cwd=ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    results = json.loads(out.read_text())["results"]
    assert not results["correctness"]["failures"] and len(results["correctness"]["errors"]) == 8
    for dtype in ("float32", "bfloat16"):
        for implementation in ("xla", "pallas"):
            timing = results["timing"][f"{implementation} {dtype}"]
            assert max(timing["relative_error_vs_reference"].values()) < 1e-5, (implementation, dtype)
    stages = results["stages"]
    assert {"wy_forward", "wy_from_inverse", "states_backward", "wy_backward"} <= stages.keys()
    assert all(stages[name]["array_gbps"] > 0 for name in ("wy_forward", "states_backward"))
    assert stages["kernels_in_forward_backward_s"] > 0 and all("error" not in r for r in results["sweep"].values())
    assert len(results["sweep"]) == 12


@pytest.mark.parametrize("changes", [{}, {"precision": "bfloat16"}])
def test_stage_flops_count_the_dots_the_kernels_run(changes):
    """bench.py's per-stage TFLOP/s divide `stage_flops` by time: it must count exactly the dots in the lowered
    kernels (after Triton-bound dead-code elimination of the primal outputs that `jax.vjp` computes)."""
    from pallas_kernels.gated_delta.bench import stage_flops

    modules = triton_modules(**changes)
    assert not any("#loc" in module or "[unknown]" in module for module in modules.values())  # parseable MLIR
    macs = {name: dot_macs(module) for name, module in modules.items()}
    column_blocks = 128 // 64  # the sequential kernels run d_v / BV programs per chunk step
    per_chunk = {
        "wy_forward": macs["wy"],
        "states_forward": macs["states"] * column_blocks,
        "output_forward": macs["output"],
        "wy_from_inverse": macs["wy_from_inverse"],
        "output_backward": macs["output_bwd"],
        "states_backward": macs["states_bwd"] * column_blocks,
        "wy_backward": macs["wy_bwd"],
    }
    assert per_chunk == {name: count // 2 for name, count in stage_flops(64, 128, 128).items()}
