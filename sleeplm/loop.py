"""The training run: data pipeline, jitted steps, periodic evaluation, JSONL metrics, a progress bar,
checkpoints with resume, and a guard that stops on a non-finite loss before anything is saved."""

from __future__ import annotations

import json
import time
from pathlib import Path

import grain
import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from sleeplm import train as train_lib
from sleeplm.checkpoint import Checkpointer
from sleeplm.data import make_source
from sleeplm.evaluate import MODEL_KEYS, eval_sets, evaluate
from sleeplm.presets import Experiment


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite; the run stopped without saving."""


def train_iterator(experiment: Experiment) -> grain.DatasetIterator:
    """The training batches, in an order fixed by the seed (the same for every N), as a checkpointable iterator."""
    source = make_source(experiment.task, "train", seed=experiment.train.seed)
    dataset = grain.MapDataset.source(source).batch(experiment.train.batch_size, drop_remainder=True)
    return iter(dataset.to_iter_dataset())


class MetricsLog:
    """Appends JSON records to metrics.jsonl; on resume, drops records past the restored step first."""

    def __init__(self, path: Path, resume_step: int) -> None:
        self.path = path
        kept = []
        if path.exists() and resume_step > 0:
            kept = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= resume_step]
        path.write_text("".join(line + "\n" for line in kept))

    def write(self, record: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")


def run_training(experiment: Experiment, workdir: Path, *, resume: bool = True, stop_at: int | None = None) -> dict:
    """Trains `experiment` in `workdir` (checkpoints/, metrics.jsonl, experiment.json); returns the last eval.

    `stop_at` ends the run early at that step (checkpointing it) as if interrupted, without changing the schedule.
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    config, train, run = experiment.config, experiment.train, experiment.run
    iterator = train_iterator(experiment)
    state = train_lib.init_train_state(jax.random.key(train.seed), config, train)
    checkpoints = Checkpointer(workdir / "checkpoints", keep=run.keep_checkpoints)
    if resume and checkpoints.latest_step() is not None:
        state = checkpoints.restore(state, iterator, experiment)
    start = int(state.step)
    (workdir / "experiment.json").write_text(json.dumps(experiment.to_json(), indent=2) + "\n")
    log = MetricsLog(workdir / "metrics.jsonl", resume_step=start)
    sets = eval_sets(experiment)
    tokens_per_step = train.batch_size * experiment.task.sequence_length  # real tokens, not padding
    stop = min(stop_at or train.steps, train.steps)

    pending: list[tuple[int, dict]] = []
    last_eval: dict = {}
    clock = time.perf_counter()
    bar = tqdm(total=train.steps, initial=start, disable=not run.progress, desc=f"N={config.sleep.passes}")

    def flush(step: int) -> None:
        """Fetches the pending step metrics (one host sync per flush), checks them, writes them."""
        nonlocal clock
        if not pending:
            return
        values = jax.device_get([m for _, m in pending])
        elapsed, clock = time.perf_counter() - clock, time.perf_counter()
        for (s, _), m in zip(pending, values, strict=True):
            if not np.isfinite(m["loss"]):
                raise NonFiniteLossError(
                    f"training loss is {m['loss']} at step {s}: stopped before saving; the last checkpoint in "
                    f"{checkpoints.directory} is step {checkpoints.latest_step()}"
                )
            log.write({"step": s, "kind": "train", "loss": float(m["loss"]), "grad_norm": float(m["grad_norm"])})
        tokens_per_s = len(pending) * tokens_per_step / elapsed
        bar.set_postfix(loss=f"{float(values[-1]['loss']):.4f}", tok_s=f"{tokens_per_s:,.0f}")
        bar.update(step - bar.n)
        pending.clear()

    for step in range(start + 1, stop + 1):
        batch = {key: jnp.asarray(value) for key, value in next(iterator).items() if key in MODEL_KEYS}
        state, metrics = train_lib.train_step(state, batch, config, train)
        pending.append((step, metrics))
        evaluating, saving = step % run.eval_every == 0 or step == train.steps, step % run.checkpoint_every == 0
        if step % run.log_every == 0 or evaluating or saving or step == stop:
            flush(step)
        if evaluating:
            last_eval = {"step": step, "kind": "eval", "tokens": step * tokens_per_step}
            last_eval |= evaluate(state.params, sets, experiment)
            log.write(last_eval)
            bar.write(
                f"step {step}: "
                + ", ".join(f"{k} {v:.3f}" for k, v in last_eval.items() if k in ("loss", "accuracy", "exact"))
            )
        if saving or step == stop:
            checkpoints.save(state, iterator, experiment)
    bar.close()
    return last_eval
