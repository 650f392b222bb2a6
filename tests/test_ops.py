"""The gated delta rule implementations against the recurrence (float64 NumPy and float32/float64 JAX).

"pallas" runs the Pallas kernels in interpret mode on CPU: the same kernel bodies that lower on GPU.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import numpy_gated_delta_rule, random_gdr_inputs, relative_error

from sleeplm.ops import gated_delta_rule, unit_lower_triangular_inverse

ARG_NAMES = ("q", "k", "v", "g", "beta", "initial_state")
IMPLEMENTATIONS = ["reference", "xla", "pallas"]


def run(inputs, implementation, chunk_size=64):
    return gated_delta_rule(**inputs, implementation=implementation, chunk_size=chunk_size)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("chunk_size", [1, 7, 16, 64])
@pytest.mark.parametrize("length", [1, 37, 64, 100])
def test_forward_matches_float64_recurrence(implementation, chunk_size, length):
    inputs = random_gdr_inputs(length, length=length)
    out, state = run(inputs, implementation, chunk_size)
    expected_out, expected_state = numpy_gated_delta_rule(**inputs)
    assert out.dtype == jnp.float32 and state.dtype == jnp.float32
    assert relative_error(out, expected_out) < 2e-6
    assert relative_error(state, expected_state) < 2e-6


def _loss_and_grads(inputs, implementation, chunk_size, cotangents):
    def loss(*args):
        out, state = gated_delta_rule(*args, implementation=implementation, chunk_size=chunk_size)
        return jnp.sum(out * cotangents[0]) + jnp.sum(state * cotangents[1])

    args = [jnp.asarray(inputs[name]) for name in ARG_NAMES]
    return jax.grad(loss, argnums=tuple(range(6)))(*args)


def assert_gradients_match(inputs, implementation, chunk_size, seed=2):
    """All six gradients against the float32 recurrence and a float64 gold, by per-tensor relative error."""
    rng = np.random.default_rng(seed)
    cotangents = (rng.normal(size=inputs["v"].shape), rng.normal(size=inputs["initial_state"].shape))
    grads = _loss_and_grads(inputs, implementation, chunk_size, [c.astype(np.float32) for c in cotangents])
    grads_ref = _loss_and_grads(inputs, "reference", chunk_size, [c.astype(np.float32) for c in cotangents])
    with jax.enable_x64(True):
        inputs64 = {name: x.astype(np.float64) for name, x in inputs.items()}
        grads_gold = _loss_and_grads(inputs64, "reference", chunk_size, cotangents)
        assert grads_gold[0].dtype == jnp.float64
        grads_gold = [np.asarray(x) for x in grads_gold]
    for name, grad, grad_ref, grad_gold in zip(ARG_NAMES, grads, grads_ref, grads_gold, strict=True):
        assert grad.dtype == jnp.float32, name
        assert np.all(np.isfinite(grad)), name
        assert relative_error(grad, grad_gold) < 1e-5, name
        assert relative_error(grad_ref, grad_gold) < 1e-5, name
        assert relative_error(grad, grad_ref) < 1e-5, name


@pytest.mark.parametrize(
    ("implementation", "chunk_size"),
    # pallas (interpret mode, slow on CPU) at an odd and the default chunk; chunk 16 in the extreme-gate tests
    [*(("xla", c) for c in (1, 7, 16, 64)), ("pallas", 7), ("pallas", 64)],
)
def test_gradients_match_reference_and_float64(implementation, chunk_size):
    assert_gradients_match(random_gdr_inputs(1, length=45), implementation, chunk_size)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_beta_zero_freezes_state(implementation, gdr_inputs):
    inputs = dict(gdr_inputs, beta=np.zeros_like(gdr_inputs["beta"]), g=np.zeros_like(gdr_inputs["g"]))
    out, state = run(inputs, implementation, chunk_size=16)
    np.testing.assert_allclose(state, inputs["initial_state"], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(out, np.einsum("bhkv,bthk->bthv", inputs["initial_state"], inputs["q"]), atol=1e-5)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_alpha_one_beta_one_recalls_exactly(implementation, gdr_inputs):
    """With alpha = 1 and beta = 1 each write makes S_t^T k_t = v_t, so reading with q_t = k_t returns v_t."""
    inputs = dict(
        gdr_inputs,
        q=gdr_inputs["k"],
        g=np.zeros_like(gdr_inputs["g"]),
        beta=np.ones_like(gdr_inputs["beta"]),
    )
    out, _ = run(inputs, implementation, chunk_size=16)
    np.testing.assert_allclose(out, inputs["v"], atol=2e-5)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("gate", ["zero", "strong", "mixed"])
def test_extreme_gates(implementation, gate):
    inputs = extreme_gate_inputs(gate)
    out, state = run(inputs, implementation, chunk_size=16)
    expected_out, expected_state = numpy_gated_delta_rule(**inputs)
    assert np.all(np.isfinite(out)) and np.all(np.isfinite(state))
    assert relative_error(out, expected_out) < 2e-6
    assert relative_error(state, expected_state) < 2e-6


def extreme_gate_inputs(gate: str) -> dict:
    inputs = random_gdr_inputs(3, length=50, gate_scale=1.0)
    rng = np.random.default_rng(4)
    if gate == "zero":
        inputs["g"] = np.zeros_like(inputs["g"])
    elif gate == "strong":
        inputs["g"] = -rng.uniform(20.0, 60.0, size=inputs["g"].shape).astype(np.float32)
    else:  # ordinary gates with a few near-resets (alpha ~ e^-1000) sprinkled in
        inputs["g"] = np.where(rng.uniform(size=inputs["g"].shape) < 0.1, -1000.0, inputs["g"]).astype(np.float32)
    return inputs


@pytest.mark.parametrize("implementation", ["xla", "pallas"])
@pytest.mark.parametrize("gate", ["zero", "mixed"])
def test_gradients_under_extreme_gates(implementation, gate):
    assert_gradients_match(extreme_gate_inputs(gate), implementation, chunk_size=16)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_prefix_state_suffix_equals_one_pass(implementation, gdr_inputs):
    split = 21
    out, state = run(gdr_inputs, implementation, chunk_size=16)
    prefix = {n: x[:, :split] if n != "initial_state" else x for n, x in gdr_inputs.items()}
    suffix = {n: x[:, split:] for n, x in gdr_inputs.items() if n != "initial_state"}
    out_a, state_a = run(prefix, implementation, chunk_size=16)
    out_b, state_b = run(dict(suffix, initial_state=state_a), implementation, chunk_size=16)
    assert relative_error(np.concatenate([out_a, out_b], axis=1), out) < 1e-6
    assert relative_error(state_b, state) < 1e-6


def test_default_initial_state_is_zero(gdr_inputs):
    inputs = dict(gdr_inputs)
    inputs.pop("initial_state")
    out, state = gated_delta_rule(**inputs)
    zero = np.zeros_like(gdr_inputs["initial_state"])
    expected_out, expected_state = numpy_gated_delta_rule(**inputs, initial_state=zero)
    assert relative_error(out, expected_out) < 2e-6 and relative_error(state, expected_state) < 2e-6


@pytest.mark.parametrize("implementation", ["xla", "pallas"])
def test_bfloat16_inputs_keep_float32_state(implementation, gdr_inputs):
    inputs = {n: jnp.asarray(x, jnp.bfloat16) if n != "initial_state" else x for n, x in gdr_inputs.items()}
    out, state = run(inputs, implementation, chunk_size=16)
    assert out.dtype == jnp.bfloat16 and state.dtype == jnp.float32
    _, expected_state = numpy_gated_delta_rule(**{n: np.asarray(x, np.float32) for n, x in inputs.items()})
    assert relative_error(state, expected_state) < 1e-5


@pytest.mark.parametrize("size", [1, 2, 5, 16, 64])
def test_unit_lower_triangular_inverse(size):
    rng = np.random.default_rng(size)
    lower = np.tril(rng.normal(scale=0.3, size=(3, size, size)), -1)
    with jax.enable_x64(True):
        inverse = np.asarray(unit_lower_triangular_inverse(jnp.asarray(lower)))
    np.testing.assert_allclose(inverse @ (np.eye(size) + lower), np.broadcast_to(np.eye(size), lower.shape), atol=1e-9)


def test_bad_inputs_name_the_argument(gdr_inputs):
    with pytest.raises(ValueError, match=r"beta has shape"):
        gated_delta_rule(**dict(gdr_inputs, beta=gdr_inputs["beta"][:, :-1]))
    with pytest.raises(ValueError, match=r"initial_state has shape"):
        gated_delta_rule(**dict(gdr_inputs, initial_state=gdr_inputs["initial_state"][:, :, :-1]))
    with pytest.raises(ValueError, match=r"implementation='fast'"):
        gated_delta_rule(**gdr_inputs, implementation="fast")
    with pytest.raises(ValueError, match=r"chunk_size=0"):
        gated_delta_rule(**gdr_inputs, chunk_size=0)
    with pytest.raises(ValueError, match=r"q must be a floating-point"):
        gated_delta_rule(**dict(gdr_inputs, q=gdr_inputs["q"].astype(np.int32)))
