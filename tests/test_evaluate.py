"""Evaluation and the loss against independent computations: `masked_loss`, `eval_step` and gradient accumulation
against NumPy on fixed logits; each task's metrics against a hand computation for an oracle model whose predictions
follow a known rule; and a task registered here alone (no package edit) through presets, training, evaluation and
the experiment record."""

from __future__ import annotations

import collections
import dataclasses
import json

import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sleeplm import Config, ModelConfig, SleepConfig
from sleeplm.data import TASKS, Task, TaskSource, Vocabulary, register_task
from sleeplm.experiment.schema import Experiment, RunConfig, TrainConfig, experiment_from_json
from sleeplm.training import step as train_lib
from sleeplm.training.evaluate import eval_sets, eval_step, evaluate
from sleeplm.training.presets import PRESETS, build_experiment
from sleeplm.training.run import run_training
from sleeplm.training.step import MODEL_KEYS, TrainState, masked_loss, train_step


@pytest.fixture
def fresh_jit():
    """Tests here swap `train.forward` (and the optimizer); the jitted steps trace afresh before and after."""
    for step in (eval_step, train_step):
        step.clear_cache()
    yield
    for step in (eval_step, train_step):
        step.clear_cache()


def numpy_cross_entropy(logits, targets):
    logits = np.asarray(logits, np.float64)
    log_z = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    return log_z - np.take_along_axis(logits, targets[..., None], -1)[..., 0]


def fixed_batch(seed=0, batch=5, length=7, vocab=6):
    """Random logits and targets (about a third of them the argmax, so some labels are right) and a mask with
    uneven label counts per row, row 1 having none."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0.0, 2.0, size=(batch, length, vocab)).astype(np.float32)
    targets = np.where(rng.random((batch, length)) < 0.35, logits.argmax(-1), rng.integers(0, vocab, (batch, length)))
    mask = (rng.random((batch, length)) < 0.5).astype(np.float32)
    mask[1] = 0.0
    mask[0, 0] = 1.0
    inputs = rng.integers(0, vocab, (batch, length))
    return logits, {"inputs": inputs.astype(np.int32), "targets": targets.astype(np.int32), "loss_mask": mask}


def test_masked_loss_is_the_mean_over_label_positions(monkeypatch, fresh_jit):
    logits, batch = fixed_batch()
    monkeypatch.setattr(train_lib, "forward", lambda params, inputs, config: jnp.asarray(logits))
    losses, mask = numpy_cross_entropy(logits, batch["targets"]), batch["loss_mask"]
    loss = masked_loss({}, jax_batch(batch), "fixed-logits")
    np.testing.assert_allclose(loss, (losses * mask).sum() / mask.sum(), rtol=1e-6)
    no_labels = dict(batch, loss_mask=np.zeros_like(mask))
    assert float(masked_loss({}, jax_batch(no_labels), "fixed-logits")) == 0.0  # 0 / max(0, 1), not NaN


def test_eval_step_per_example_metrics_match_numpy(monkeypatch, fresh_jit):
    """Row 1 has no labels: loss_sum 0, labels 0, and it counts as exact (every one of its no labels is right)."""
    logits, batch = fixed_batch()
    monkeypatch.setattr(train_lib, "forward", lambda params, inputs, config: jnp.asarray(logits))
    result = eval_step({}, jax_batch(batch), "fixed-logits-eval")
    mask = batch["loss_mask"] > 0
    right = (logits.argmax(-1) == batch["targets"]) & mask
    np.testing.assert_allclose(
        result["loss_sum"], (numpy_cross_entropy(logits, batch["targets"]) * mask).sum(-1), rtol=1e-6, atol=1e-6
    )
    np.testing.assert_array_equal(result["labels"], mask.sum(-1))
    np.testing.assert_array_equal(result["labels_right"], right.sum(-1))
    np.testing.assert_array_equal(result["exact"], right.sum(-1) == mask.sum(-1))
    np.testing.assert_array_equal(result["right"], right)
    token_loss = numpy_cross_entropy(logits, batch["targets"]) * mask
    np.testing.assert_allclose(result["token_loss"], token_loss, rtol=1e-6, atol=1e-6)
    assert result["exact"][1] and result["labels"][1] == 0 and result["loss_sum"][1] == 0
    assert 0 < right.sum() < mask.sum() and not result["exact"].all()  # the fixture has right and wrong labels


def jax_batch(batch):
    return {key: jnp.asarray(batch[key]) for key in MODEL_KEYS}


@pytest.mark.parametrize("label_counts", [(1, 5, 12), (0, 3, 7)], ids=["uneven", "one-micro-batch-without-labels"])
def test_gradient_accumulation_is_the_masked_mean_over_the_whole_batch(monkeypatch, fresh_jit, label_counts):
    """With `accumulation` micro-batches, `train_step`'s loss and gradient are those of the masked mean over the
    whole batch, sum(mask * CE) / sum(mask), however unevenly the labels fall into micro-batches (the average of the
    micro-batches' own masked means differs on this batch, and a micro-batch without labels must not count).

    The model is an embedding lookup (logits = W[inputs]) so the gradient has a closed form; the optimizer is
    replaced by SGD with rate 1 so the update is minus the accumulated gradient."""
    vocab, length, accumulation = 5, 6, 3
    rng = np.random.default_rng(1)
    weights = rng.normal(0.0, 0.5, size=(vocab, vocab)).astype(np.float32)
    inputs = rng.integers(0, vocab, (2 * accumulation, length))
    targets = rng.integers(0, vocab, (2 * accumulation, length))
    mask = np.zeros((2 * accumulation, length), np.float32)
    for micro, count in enumerate(label_counts):  # `count` labels spread over the micro-batch's two rows
        flat = mask[2 * micro : 2 * micro + 2].reshape(-1)
        flat[rng.choice(2 * length, size=count, replace=False)] = 1.0
        mask[2 * micro : 2 * micro + 2] = flat.reshape(2, length)
    batch = {"inputs": inputs.astype(np.int32), "targets": targets.astype(np.int32), "loss_mask": mask}

    def expected_loss_and_grad(rows):
        w = weights.astype(np.float64)
        logits = w[inputs[rows]]
        probabilities = np.exp(logits - logits.max(-1, keepdims=True))
        probabilities /= probabilities.sum(-1, keepdims=True)
        count = max(mask[rows].sum(), 1.0)
        loss = (numpy_cross_entropy(logits, targets[rows]) * mask[rows]).sum() / count
        grad = np.zeros_like(w)
        for (b, t), m in np.ndenumerate(mask[rows]):
            if m:
                grad[inputs[rows][b, t]] += (probabilities[b, t] - np.eye(vocab)[targets[rows][b, t]]) / count
        return loss, grad

    per_micro = [expected_loss_and_grad(slice(2 * m, 2 * m + 2)) for m in range(accumulation)]
    expected_loss, expected_grad = expected_loss_and_grad(slice(None))
    assert abs(np.mean([loss for loss, _ in per_micro]) - expected_loss) > 1e-2  # the two readings differ here

    monkeypatch.setattr(train_lib, "forward", lambda params, inputs, config: params["embedding"][inputs])
    monkeypatch.setattr(train_lib, "make_optimizer", lambda *args: optax.sgd(1.0))
    params = {"embedding": jnp.asarray(weights)}
    state = TrainState(params, optax.sgd(1.0).init(params), jnp.zeros((), jnp.int32))
    train = TrainConfig(steps=2, batch_size=2 * accumulation, warmup_steps=0, accumulation=accumulation)
    state, metrics = train_step(state, jax_batch(batch), "embedding-lookup", train)
    np.testing.assert_allclose(metrics["loss"], expected_loss, rtol=1e-6)
    np.testing.assert_allclose(weights - np.asarray(state.params["embedding"]), expected_grad, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(metrics["grad_norm"], np.linalg.norm(expected_grad), rtol=1e-5)


# --- Task metrics for an oracle model -------------------------------------------------------------------------------

CONFIDENCE = 3.0  # the oracle's logit for its prediction (every other token 0)


def oracle_metrics(experiment: Experiment, is_right, monkeypatch) -> tuple[dict, dict]:
    """`evaluate`'s metrics and the held-out sets for a model that predicts the target exactly where
    `is_right(vocab, inputs, targets)` (per position, from the tokens the model sees and the training vocabulary)
    and another token elsewhere, with logit CONFIDENCE on its prediction. Runs the real `eval_step` on those logits."""
    vocab = experiment.task.vocab
    monkeypatch.setattr(train_lib, "forward", lambda params, inputs, config: params)

    def eval_fn(params, batch):
        targets = np.asarray(batch["targets"])
        right = is_right(vocab, np.asarray(batch["inputs"]), targets)
        prediction = np.where(right, targets, (targets + 1) % len(vocab))
        logits = CONFIDENCE * np.eye(len(vocab), dtype=np.float32)[prediction]
        return eval_step(jnp.asarray(logits), batch, "oracle")

    sets = eval_sets(experiment)
    return evaluate(None, sets, experiment, eval_fn), sets


def examples_of(batches: list[dict]) -> dict:
    return {key: np.concatenate([b[key] for b in batches]) for key in batches[0]}


def generic_metrics(right_per_example: list[np.ndarray], vocab_size: int, suffix: str = "") -> dict[str, float]:
    """Loss, accuracy and exact match by hand: a right label costs log(e^c + V - 1) - c, a wrong one
    log(e^c + V - 1), with c = CONFIDENCE and V the vocabulary size."""
    right = np.concatenate(right_per_example)
    log_z = np.log(np.exp(CONFIDENCE) + vocab_size - 1)
    return {
        f"loss{suffix}": log_z - CONFIDENCE * right.mean(),
        f"accuracy{suffix}": right.mean(),
        f"exact{suffix}": np.mean([r.all() for r in right_per_example]),
    }


def assert_metrics_equal(actual: dict, expected: dict) -> None:
    assert sorted(actual) == sorted(expected)
    for key, value in expected.items():
        np.testing.assert_allclose(actual[key], value, rtol=1e-6, atol=1e-7, err_msg=key)


def test_depo_metrics_per_hop_count_for_an_oracle_that_solves_k_up_to_2(monkeypatch, fresh_jit):
    """The oracle answers a query right when its hop token (decoded with the training vocabulary) says k <= 2 and
    the answer token decodes as a node name, as any model trained on this vocabulary answers; the hand computation
    uses only the examples' `hops` metadata. A per-hop set encoded with another vocabulary decodes names as other
    tokens and fails."""
    overrides = {"task.min_nodes": "6", "task.max_nodes": "8", "task.name_tokens": "16", "task.max_hops": "4"}
    overrides |= {"task.queries": "4", "sleep.window": "16", "run.eval_examples": "64", "run.eval_batch_size": "32"}
    experiment = build_experiment("depo-cpu", overrides)
    config = experiment.task
    query_length = 2 + 2 * config.name_length

    def is_right(vocab, inputs, targets):
        right = np.zeros(targets.shape, bool)
        for row, position in zip(*np.nonzero(targets >= 0), strict=True):
            query = (position + 1 - config.edge_block_length) // query_length
            if position + 1 < config.edge_block_length or not 0 <= query < config.queries:
                continue
            hop_token = vocab.tokens[inputs[row, config.edge_block_length + query * query_length]]
            answer_token = vocab.tokens[targets[row, position]]
            hops = int(hop_token[len("<hop_") : -1]) if hop_token.startswith("<hop_") else 0
            right[row, position] = 1 <= hops <= 2 and answer_token.startswith("n")
        return right

    metrics, sets = oracle_metrics(experiment, is_right, monkeypatch)
    expected = {}
    for name, batches in sets.items():
        examples = examples_of(batches)
        hops_at_labels = [hops[mask > 0] for hops, mask in zip(examples["hops"], examples["loss_mask"], strict=True)]
        if name != "all":
            assert all(np.all(h == int(name[1:])) for h in hops_at_labels)
        expected |= generic_metrics(
            [h <= 2 for h in hops_at_labels], len(config.vocab), "" if name == "all" else f"@{name}"
        )
    assert expected["accuracy@k1"] == expected["accuracy@k2"] == 1.0 and expected["accuracy@k4"] == 0.0
    assert 0.0 < expected["exact"] < expected["accuracy"] < 1.0
    assert_metrics_equal(metrics, expected)


def test_arith_metrics_per_op_count_for_an_oracle_right_on_even_answers(monkeypatch, fresh_jit):
    """The oracle is right exactly when the answer token decodes as an even value; by hand, from the `answer` and
    `ops` metadata: accuracy per op count is the fraction of even answers among its examples, and the majority
    baseline is the most frequent answer's share."""
    overrides = {"task.num_vars": "16", "task.max_ops": "3", "task.windows": "2", "sleep.window": "24"}
    overrides |= {"run.eval_examples": "128", "run.eval_batch_size": "64"}
    experiment = build_experiment("arith-cpu", overrides)

    def is_right(vocab, inputs, targets):
        return np.vectorize(lambda t: vocab.tokens[t].isdigit() and int(vocab.tokens[t]) % 2 == 0)(targets)

    metrics, sets = oracle_metrics(experiment, is_right, monkeypatch)
    examples = examples_of(sets["all"])
    even = examples["answer"] % 2 == 0
    expected = generic_metrics([np.array([e]) for e in even], len(experiment.task.vocab))
    for count in range(1, 4):
        expected[f"accuracy@ops{count}"] = even[examples["ops"] == count].mean()
    expected["majority_answer_accuracy"] = collections.Counter(examples["answer"].tolist()).most_common(1)[0][1] / 128
    assert 0.0 < expected["accuracy"] < 1.0
    assert_metrics_equal(metrics, expected)


def test_rule110_metrics_per_label_for_an_oracle_right_on_even_labels_and_on_ones(monkeypatch, fresh_jit):
    """The oracle is right on label i when i is even or the label is "1"; by hand, label i's accuracy is 1 for
    even i and the share of "1" labels for odd i."""
    overrides = {"task.width": "6", "task.num_strings": "4", "task.steps": "1", "sleep.window": "6"}
    overrides |= {"run.eval_examples": "64", "run.eval_batch_size": "32"}
    experiment = build_experiment("rule110-cpu", overrides)
    strings = experiment.task.num_strings

    def is_right(vocab, inputs, targets):
        label = np.arange(targets.shape[1]) - (targets.shape[1] - strings)  # labels are the last `strings` inputs
        ones = np.vectorize(lambda t: vocab.tokens[t] == "1")(targets)
        return (label >= 0) & ((label % 2 == 0) | ones)

    metrics, sets = oracle_metrics(experiment, is_right, monkeypatch)
    examples = examples_of(sets["all"])
    labels = np.array([experiment.task.vocab.decode(row[-strings:]) for row in examples["targets"]])
    right = (np.arange(strings) % 2 == 0) | (labels == "1")
    expected = generic_metrics(list(right), len(experiment.task.vocab))
    expected |= {f"label{i}_accuracy": 1.0 if i % 2 == 0 else np.mean(labels[:, i] == "1") for i in range(strings)}
    assert 0.0 < expected["exact"] < 1.0
    assert_metrics_equal(metrics, expected)


# --- A task registered from a test file --------------------------------------------------------------------------

PARITY_VOCAB = Vocabulary(("0", "1", "<query>"))


@dataclasses.dataclass(frozen=True)
class ParityConfig:
    """`bits` random bits, then <query> and their parity."""

    bits: int = 6
    window: int = 4

    @property
    def sequence_length(self) -> int:
        return self.bits + 1

    @property
    def vocab(self) -> Vocabulary:
        return PARITY_VOCAB


class ParitySource(TaskSource):
    """`first=b` fixes the first bit (a held-out subset). Examples carry `ones`, the number of 1 bits."""

    def __init__(self, config, *args, first: int | None = None, **kwargs):
        super().__init__(config, *args, **kwargs)
        self.first = first

    def sample(self, rng):
        bits = rng.integers(0, 2, self.config.bits)
        if self.first is not None:
            bits[0] = self.first
        tokens = np.concatenate([bits, [2, bits.sum() % 2]]).astype(np.int32)
        return tokens, np.array([len(tokens) - 1]), {"ones": np.int32(bits.sum())}, np.packbits(bits).tobytes()


def odd_parity_exact(results, examples):
    return {"odd_parity_exact": float(results["exact"][examples["ones"] % 2 == 1].mean())}


PARITY = Task(
    "parity",
    ParityConfig,
    ParitySource,
    held_out_sets=lambda config: {"first1": {"first": 1}},
    metrics=odd_parity_exact,
)


@pytest.fixture
def parity_preset(monkeypatch):
    """The parity task registered and a preset of it, both gone after the test."""
    register_task(PARITY)
    try:
        model = ModelConfig(vocab_size=2, d_model=16, layers=("attn", "gdn"), num_heads=2, mlp_dim=32)
        monkeypatch.setitem(
            PRESETS,
            "parity-tiny",
            Experiment(
                ParityConfig(),
                Config(model, SleepConfig(window=4, passes=2)),
                TrainConfig(steps=2, batch_size=8, warmup_steps=1),
                RunConfig(eval_every=2, eval_examples=16, eval_batch_size=16, checkpoint_every=2, progress=False),
            ),
        )
        yield
    finally:
        del TASKS["parity"]


def test_a_task_registered_outside_the_package_trains_evaluates_and_records(tmp_path, parity_preset):
    experiment = build_experiment("parity-tiny", {"task.bits": "7", "sleep.window": "3"})
    assert experiment.task == ParityConfig(bits=7, window=3) and experiment.config.model.vocab_size == 3
    assert experiment.task_name == "parity"
    record = experiment.to_json()
    assert record["task_name"] == "parity" and record["task"] == {"bits": 7, "window": 3}
    assert experiment_from_json(record) == experiment
    sets = eval_sets(experiment)
    assert list(sets) == ["all", "first1"]
    assert all(np.all(batch["inputs"][:, 0] == 1) for batch in sets["first1"])
    result = run_training(experiment, tmp_path / "run")
    assert {"loss", "accuracy", "exact", "loss@first1", "accuracy@first1", "exact@first1", "odd_parity_exact"} <= set(
        result
    )
    saved = json.loads((tmp_path / "run" / "experiment.json").read_text())
    assert saved == record and experiment_from_json(saved) == experiment
