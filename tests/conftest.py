"""Shared helpers: an independent float64 NumPy recurrence and a relative error metric."""

from __future__ import annotations

import gc
import os

# The tests' models are tiny: compiling them dominates the suite's time, and LLVM's optimisation of the compiled CPU
# code buys nothing at these sizes. Level 0 compiles about a third faster; the subprocess checks inherit it.
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"

import jax
import numpy as np
import pytest
from hypothesis import settings

# Hypothesis (tests/test_fuzz*.py): a bounded number of examples per property in `make test` ("ci"), ten times more
# with SLEEPLM_HYPOTHESIS=slow (`make test-slow`). No deadline: an example may compile. No example database: runs
# read and write nothing outside the temporary directories. Derandomized: a run draws the same examples every time, so
# a test run's result depends on the code alone; SLEEPLM_HYPOTHESIS=explore draws afresh (to look for new failures).
settings.register_profile("ci", max_examples=40, deadline=None, database=None, print_blob=True, derandomize=True)
settings.register_profile("slow", max_examples=400, deadline=None, database=None, print_blob=True, derandomize=True)
settings.register_profile("explore", max_examples=400, deadline=None, database=None, print_blob=True)
settings.load_profile(os.environ.get("SLEEPLM_HYPOTHESIS", "ci"))

# Checks that run with `make test-slow` only (CI runs both), so that `make test` stays under 10 minutes on 2 cores:
# each is a further case of a check that `make test` runs at another setting, or a long end-to-end run.
SLOW = {
    "test_parallel.py": [
        "test_three_sharded_steps_match_one_device",
        "test_params_and_optimizer_state_are_sharded",
        "test_eval_and_streaming_under_a_mesh",
        "test_data_parallel_replicates_params",
        "test_pallas_kernels_run_per_shard_under_a_mesh",
        "test_a_mesh_that_does_not_divide",
    ],
    "test_sleep.py": [
        "test_forward_matches_looped_reference_and_streaming[1-",
        "[2-hard-18]",
        "[2-sliding-17]",
        "[3-sliding-18]",
        "test_four_block_stack_matches_looped_reference[sliding]",
        "test_bfloat16_activations",
        "test_pieces_that_cross_window_boundaries_stream_like_forward[slid",
        "test_away_from_initialisation_logits_and_final_states_agree[sliding",
    ],
    "test_generate.py": [
        "test_greedy_generation_is_the_argmax_of_forward_over_what_it_generated[3-sliding]",
        "test_a_saved_and_restored_stream_continues_exactly_like_an_uninterrupted_one[deferred]",
        "test_sampling_is_deterministic_in_the_key_and_stays_in_the_top_k",
    ],
    "test_loop.py": ["test_mismatched_and_corrupted_checkpoints_fail_clearly"],
    "test_evaluate.py": ["test_a_task_registered_outside_the_package_trains_evaluates_and_records"],
    "test_looped_blocks.py": ["test_one_pass_with_looped_blocks_is_the_unlooped_model"],
    "test_ops.py": [
        "test_gradients_match_reference_and_float64[xla-1]",
        "[xla-16]",
        "[pallas-64]",
        "test_gradients_under_extreme_gates[zero-pallas]",
        "[mixed-pallas]",
    ],
    "test_pallas_gated_delta.py": [
        "test_padded_layouts_and_blocks_match_the_reference[gpu-24-12-32]",
        "test_stage1_and_its_backward_match_a_float64_solve[64-1.0-4]",
        "[16-1.0-64]",
    ],
    "test_train.py": ["test_gradient_accumulation_matches_one_big_batch"],
    "test_packing.py": ["test_packed_rows_equal_each_document_alone[3-hard]"],
    "test_hf.py": ["test_the_new_kinds_stream_and_sleep_like_forward[sliding]"],
    "test_cache.py": ["test_two_processes_building_the_same_cache_at_once_make_one_complete_cache"],
    "test_eviction.py": [
        "test_sinks_forward_equals_streaming_and_final_states[sinks]",
        "test_greedy_generation_under_sinks_is_the_argmax_of_forward",
    ],
    "test_text.py": ["test_eval_uses_the_runs_tokenizer_and_refuses_a_corpus_changed_since_training"],
    "test_preemption.py": ["test_"],
    "test_tensorboard.py": ["test_"],
    "test_fault_injection.py": ["test_"],
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if any(name in item.name for name in SLOW.get(item.path.name, ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="module", autouse=True)
def _release_compiled_programs():
    """Drops every compiled program after each test module. Each holds about three memory mappings of its code
    (measured), and workers that ran most of the suite without this aborted inside XLA's compiler, as a process
    does when its mappings reach the kernel's limit (vm.max_map_count, 65530 here)."""
    yield
    jax.clear_caches()
    gc.collect()


def numpy_gated_delta_rule(q, k, v, g, beta, initial_state):
    """Float64 NumPy recurrence, written independently of the package (explicit per-example loops)."""
    q, k, v, g, beta, state = (np.asarray(x, np.float64) for x in (q, k, v, g, beta, initial_state))
    batch, length, heads, _ = q.shape
    state = state.copy()
    out = np.zeros(v.shape, np.float64)
    for b in range(batch):
        for h in range(heads):
            s = state[b, h]
            for t in range(length):
                s = np.exp(g[b, t, h]) * s
                s = s + beta[b, t, h] * np.outer(k[b, t, h], v[b, t, h] - s.T @ k[b, t, h])
                out[b, t, h] = s.T @ q[b, t, h]
            state[b, h] = s
    return out, state


def relative_error(actual, expected) -> float:
    """RMS(actual - expected) / RMS(expected), the per-tensor metric of flash-linear-attention's tests."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return float(np.sqrt(np.mean((actual - expected) ** 2)) / max(np.sqrt(np.mean(expected**2)), 1e-30))


def random_gdr_inputs(seed, batch=2, length=37, heads=3, d_k=16, d_v=8, gate_scale=1.0):
    """Inputs as a GDN layer produces them: unit-norm q and k, g <= 0, beta in (0, 1), a random start state."""
    rng = np.random.default_rng(seed)

    def unit(x):
        return x / np.linalg.norm(x, axis=-1, keepdims=True)

    return dict(
        q=unit(rng.normal(size=(batch, length, heads, d_k))).astype(np.float32),
        k=unit(rng.normal(size=(batch, length, heads, d_k))).astype(np.float32),
        v=rng.normal(size=(batch, length, heads, d_v)).astype(np.float32),
        g=(-gate_scale * rng.uniform(0.0, 1.0, size=(batch, length, heads))).astype(np.float32),
        beta=rng.uniform(0.0, 1.0, size=(batch, length, heads)).astype(np.float32),
        initial_state=rng.normal(size=(batch, heads, d_k, d_v)).astype(np.float32),
    )


@pytest.fixture
def gdr_inputs():
    return random_gdr_inputs(0)


def text_run_files(path, overrides: dict[str, str], texts: list[str], vocab_size: int = 270):
    """A text run's files without training: its experiment (`lm-cpu` with `overrides`) and a BPE of `vocab_size`
    tokens trained on `texts`; no checkpoint yet (`save_random_weights` adds one)."""
    from sleeplm.data.tokenizer import train_tokenizer
    from sleeplm.experiment.workdir import Workdir
    from sleeplm.training.presets import build_experiment

    run = Workdir(path)
    run.write_experiment(build_experiment("lm-cpu", overrides))
    train_tokenizer(texts, vocab_size, run.tokenizer_path)
    run.checkpoints_path.mkdir()
    return run


def save_random_weights(run):
    """`run` with its model's random initial parameters saved as the checkpoint of step 0."""
    from sleeplm import init_params

    experiment = run.experiment()
    run.checkpoints().save_weights(init_params(jax.random.key(0), experiment.config), experiment)
    return run


def tiny_text_model(window: int) -> dict[str, str]:
    """Overrides of `lm-cpu` for a two-block text model of d=16 (BPE of 270 tokens, N=2, hard eviction) with
    window `window`: small enough that its tests compile in seconds."""
    model = {"model.d_model": "16", "model.num_heads": "2", "model.layers": "attn,gdn", "model.mlp_dim": "32"}
    sleep = {"sleep.window": str(window), "sleep.passes": "2", "sleep.eviction": "hard"}
    return {"task.vocab_size": "270"} | sleep | model
