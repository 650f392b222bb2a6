"""Training core: the loss goes down on each task; Muon gets exactly the hidden matrices; accumulation is exact."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sleeplm import Config, ModelConfig, SleepConfig
from sleeplm.data import ArithConfig, DepoConfig, Rule110Config, batched, make_source
from sleeplm.experiment.schema import TrainConfig
from sleeplm.training.evaluate import eval_step
from sleeplm.training.optimizer import optimizer_labels
from sleeplm.training.step import init_train_state, train_step

TASKS = {
    "rule110": Rule110Config(width=8, num_strings=2, steps=0, window=8),
    "depo": DepoConfig(max_nodes=6, min_nodes=4, name_tokens=8, name_length=1, max_hops=2, queries=3, window=12),
    "arith": ArithConfig(num_vars=12, modulus=3, max_ops=2, windows=2, window=16),
}


def small_config(vocab_size: int, window: int) -> Config:
    model = ModelConfig(vocab_size=vocab_size, d_model=32, layers=("attn", "gdn"), num_heads=2, mlp_dim=64)
    return Config(model, SleepConfig(window=window, passes=2))


@pytest.mark.parametrize("task", ["rule110", *(pytest.param(t, marks=pytest.mark.slow) for t in ("depo", "arith"))])
def test_a_few_steps_reduce_the_loss(task):
    task_config = TASKS[task]
    source = make_source(task_config, "train", seed=0, size=16)
    config = small_config(len(source.vocab), task_config.window)
    train = TrainConfig(steps=12, batch_size=16, warmup_steps=2, muon_lr=2e-2, adam_lr=1e-2)
    state = init_train_state(jax.random.key(0), config, train)
    batch = jax.tree.map(jnp.asarray, batched(source, 16, seed=0)[0])
    losses = []
    for _ in range(train.steps):  # one fixed batch: the loss must fall
        state, metrics = train_step(state, batch, config, train)
        losses.append(float(metrics["loss"]))
    assert np.all(np.isfinite(losses)) and losses[-1] < 0.7 * losses[0], losses
    metrics = eval_step(state.params, batch, config)
    assert metrics["exact"].shape == (16,) and np.all(metrics["labels"] == batch["loss_mask"].sum(-1))


def test_muon_gets_exactly_the_hidden_matrices():
    config = small_config(8, 8)
    chosen = {
        jax.tree_util.keystr(path)
        for path, label in jax.tree_util.tree_leaves_with_path(optimizer_labels(config))
        if label == "muon"
    }
    assert "['params']['blocks_0']['attn']['q']['kernel']" in chosen
    assert "['params']['blocks_1']['mlp']['down']['kernel']" in chosen
    assert not any(name in path for path in chosen for name in ("embedding", "head", "'a'", "'b'", "conv", "scale"))


def test_gradient_accumulation_matches_one_big_batch():
    task_config = TASKS["rule110"]
    source = make_source(task_config, "train", seed=0, size=16)
    config = small_config(len(source.vocab), task_config.window)
    batch = jax.tree.map(jnp.asarray, batched(source, 16, seed=0)[0])
    results = []
    for accumulation in (1, 4):
        train = TrainConfig(steps=4, batch_size=16, warmup_steps=1, accumulation=accumulation)
        state = init_train_state(jax.random.key(0), config, train)
        state, metrics = train_step(state, batch, config, train)
        results.append((state.params, float(metrics["loss"])))
    assert abs(results[0][1] - results[1][1]) < 1e-6
    for a, b in zip(jax.tree.leaves(results[0][0]), jax.tree.leaves(results[1][0]), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_bad_train_settings_fail_clearly():
    with pytest.raises(ValueError, match=r"train.accumulation=3 is invalid: must divide batch_size"):
        TrainConfig(batch_size=64, accumulation=3)
    with pytest.raises(ValueError, match=r"train.warmup_steps=600 is invalid"):
        dataclasses.replace(TrainConfig(), warmup_steps=600)
