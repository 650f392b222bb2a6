"""Metrics on fixed held-out sets: loss per label, label accuracy and exact match (every label of an example right)
on "all" and on each of the task's extra held-out sets (suffixed "@name", e.g. Depo's "accuracy@k4"), plus the
task's own metrics on "all" (`Task.metrics`, e.g. Rule 110 per-label accuracy, arithmetic accuracy per op count)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sleeplm.config import Config
from sleeplm.data import batched, make_source, task_of
from sleeplm.experiment.schema import Experiment
from sleeplm.training.step import model_batch, model_logits


@functools.partial(jax.jit, static_argnames=("config",))
def eval_step(params, batch: dict, config: Config) -> dict:
    """Per-example metrics: summed label loss, label count, labels right, whether every label is right, and per
    position the label's loss and whether it is right (`token_loss`, `right`: 0 / False off the labels)."""
    logits = model_logits(params, batch, config)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
    mask = batch["loss_mask"]
    right = (jnp.argmax(logits, -1) == batch["targets"]) * mask
    return {
        "loss_sum": jnp.sum(losses * mask, axis=-1),
        "token_loss": losses * mask,
        "labels": jnp.sum(mask, axis=-1),
        "labels_right": jnp.sum(right, axis=-1),
        "exact": jnp.all((right == mask), axis=-1),
        "right": right > 0,
    }


def eval_sets(experiment: Experiment) -> dict[str, list[dict]]:
    """Named lists of held-out batches (numpy), generated once per run: "all", then the task's held-out sets.

    Every set comes from a source of the experiment's own task config, so it shares the training vocabulary.
    """
    run, config, seed = experiment.run, experiment.task, experiment.train.seed
    task = task_of(config)

    def batches(**source_options) -> list[dict]:
        source = make_source(config, "eval", seed=seed, size=run.eval_examples, **source_options)
        return list(batched(source, run.eval_batch_size, seed=seed, shuffle=False))

    extra = task.held_out_sets(config)
    if "all" in extra:
        raise ValueError(f"task {task.name!r} names a held-out set 'all': that name is the whole held-out set's")
    return {"all": batches(), **{name: batches(**options) for name, options in extra.items()}}


def _concatenate(dicts: list[dict]) -> dict:
    return {key: np.concatenate([np.atleast_1d(d[key]) for d in dicts]) for key in dicts[0]}


def evaluate(params, sets: dict[str, list[dict]], experiment: Experiment, eval_fn=None) -> dict[str, float]:
    """Flat dict of metrics for the experiment's task. `eval_fn(params, batch)` defaults to `train.eval_step`
    (a sharded run passes its sharded eval step)."""
    eval_fn = eval_fn or (lambda p, batch: eval_step(p, batch, experiment.config))
    task = task_of(experiment.task)
    metrics: dict[str, float] = {}
    for name, batches in sets.items():
        results = [jax.device_get(eval_fn(params, jax.tree.map(jnp.asarray, model_batch(b)))) for b in batches]
        result, examples = _concatenate(results), _concatenate(batches)
        suffix = "" if name == "all" else f"@{name}"
        metrics[f"loss{suffix}"] = float(result["loss_sum"].sum() / result["labels"].sum())
        metrics[f"accuracy{suffix}"] = float(result["labels_right"].sum() / result["labels"].sum())
        metrics[f"exact{suffix}"] = float(result["exact"].mean())
        if name == "all":
            metrics.update(task.metrics(result, examples))
    return metrics
