"""A run can be watched: TensorBoard events beside metrics.jsonl (read back with tensorboard's own reader) hold the
same train and eval values, each step once after a resume that re-runs steps; and metrics.jsonl counts the real
(non-padding) tokens of the text task's packed rows, exactly across a resume."""

from __future__ import annotations

import dataclasses
import shutil

import numpy as np
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from test_loop import records
from test_text import text_experiment, write_corpus

from sleeplm.training import run as loop
from sleeplm.training.optimizer import learning_rates
from sleeplm.training.tensorboard import TENSORBOARD, tag


def test_events_match_metrics_jsonl_once_per_step_after_a_resume_and_tokens_are_real(tmp_path):
    write_corpus(tmp_path / "corpus")
    experiment = text_experiment(tmp_path)
    small = dataclasses.replace(experiment.config.model, d_model=16, num_heads=2, mlp_dim=32)
    settings = dict(eval_every=3, eval_examples=4, eval_batch_size=4, checkpoint_every=3, log_every=1, progress=False)
    experiment = dataclasses.replace(
        experiment,
        config=dataclasses.replace(experiment.config, model=small),
        train=dataclasses.replace(experiment.train, steps=6, warmup_steps=2),
        run=dataclasses.replace(experiment.run, **settings),
    )
    run = tmp_path / "run"
    loop.run_training(experiment, run, stop_at=5)  # checkpoints 3 and 5, events of steps 1-5
    shutil.rmtree(run / "checkpoints" / "5")  # killed before step 5 was saved: steps 4 and 5 run again
    loop.run_training(experiment, run)

    # The real tokens: the `valid` inputs of the batches the run trained on, counted again from a fresh iterator.
    iterator = loop.train_iterator(experiment)
    per_step = [int(np.sum(next(iterator)["valid"])) for _ in range(6)]
    cumulative = list(np.cumsum(per_step))
    padded = experiment.train.batch_size * experiment.task.sequence_length
    assert all(0 < n <= padded for n in per_step) and sum(per_step) < 6 * padded, per_step  # some rows hold padding
    train = [r for r in records(run) if r["kind"] == "train"]
    evals = [r for r in records(run) if r["kind"] == "eval"]
    assert [(r["step"], r["tokens"]) for r in train] == list(zip(range(1, 7), cumulative, strict=True))
    assert [(r["step"], r["tokens"]) for r in evals] == [(3, cumulative[2]), (6, cumulative[5])]

    events = EventAccumulator(str(run / TENSORBOARD), size_guidance={"scalars": 0})
    events.Reload()
    scalars = lambda tag: [(e.step, e.value) for e in events.Scalars(tag)]
    for name in ("loss", "grad_norm"):
        assert scalars(f"train/{name}") == [(r["step"], np.float32(r[name])) for r in train], name
    for name, schedule in learning_rates(experiment.train).items():
        assert scalars(f"train/{name}") == [(s, np.float32(schedule(s - 1))) for s in range(1, 7)], name
    assert scalars("train/muon_lr")[0][1] == 0.0 < scalars("train/muon_lr")[1][1]  # warmup from 0
    assert [s for s, _ in scalars("train/real_tokens_per_s")] == list(range(1, 7))
    metrics = [key for key, value in evals[0].items() if isinstance(value, float) and key not in ("seconds",)]
    assert "perplexity" in metrics and "loss@pos0-L" in metrics and tag("eval", "loss@pos0-L") == "eval/loss_pos0-L"
    for name in metrics:
        assert scalars(tag("eval", name)) == [(r["step"], np.float32(r[name])) for r in evals], name
