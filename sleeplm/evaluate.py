"""Task metrics on a fixed held-out set (SPEC §4): Rule 110 exact match and per-label accuracy; Depo loss and
accuracy per hop count k; arithmetic accuracy per op count with the majority-answer baseline beside it."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from sleeplm.data import DepoConfig, Rule110Config, batched, make_source
from sleeplm.presets import Experiment
from sleeplm.train import eval_step

DEPO_HOPS = (1, 2, 4, 8, 16)
MODEL_KEYS = ("inputs", "targets", "loss_mask")


def eval_sets(experiment: Experiment) -> dict[str, list[dict]]:
    """Named lists of held-out batches (numpy), generated once per run: "all", and for Depo one per hop count."""
    run, task, seed = experiment.run, experiment.task, experiment.train.seed

    def batches(task_config) -> list[dict]:
        source = make_source(task_config, "eval", seed=seed, size=run.eval_examples)
        return list(batched(source, run.eval_batch_size, seed=seed, shuffle=False))

    sets = {"all": batches(task)}
    if isinstance(task, DepoConfig):
        for k in DEPO_HOPS:
            if k <= task.max_hops:
                sets[f"k{k}"] = batches(dataclasses.replace(task, min_hops=k, max_hops=k))
    return sets


def _concatenate(dicts: list[dict]) -> dict:
    return {key: np.concatenate([np.atleast_1d(d[key]) for d in dicts]) for key in dicts[0]}


def evaluate(params, sets: dict[str, list[dict]], experiment: Experiment, eval_fn=None) -> dict[str, float]:
    """Flat dict of metrics for the experiment's task. `eval_fn(params, batch)` defaults to `train.eval_step`
    (a sharded run passes its sharded eval step)."""
    eval_fn = eval_fn or (lambda p, batch: eval_step(p, batch, experiment.config))
    metrics: dict[str, float] = {}
    for name, batches in sets.items():
        results = [jax.device_get(eval_fn(params, {k: jnp.asarray(b[k]) for k in MODEL_KEYS})) for b in batches]
        result, data = _concatenate(results), _concatenate(batches)
        suffix = "" if name == "all" else f"@{name}"
        metrics[f"loss{suffix}"] = float(result["loss_sum"].sum() / result["labels"].sum())
        metrics[f"accuracy{suffix}"] = float(result["labels_right"].sum() / result["labels"].sum())
        metrics[f"exact{suffix}"] = float(result["exact"].mean())
        if name != "all":
            continue
        if isinstance(experiment.task, Rule110Config):  # every example has num_strings labels, in order
            per_label = result["right"][data["loss_mask"] > 0].reshape(len(result["exact"]), -1)
            metrics.update({f"label{i}_accuracy": float(a) for i, a in enumerate(per_label.mean(0))})
        if "ops" in data:
            for count in np.unique(data["ops"]):
                metrics[f"accuracy@ops{count}"] = float(result["exact"][data["ops"] == count].mean())
            metrics["majority_answer_accuracy"] = float(np.bincount(data["answer"]).max() / len(data["answer"]))
    return metrics
