"""The training run: data pipeline, jitted steps, periodic evaluation, JSONL metrics and TensorBoard events, a
progress bar, checkpoints with resume, a clean stop on SIGTERM / SIGINT (`sleeplm.training.preemption`), and a
guard that stops on a non-finite loss or gradient before anything is saved."""

from __future__ import annotations

import json
import time
from pathlib import Path

import grain
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from tqdm.auto import tqdm

from sleeplm.data import make_source, save_run_files
from sleeplm.experiment.schema import Experiment
from sleeplm.experiment.workdir import Workdir
from sleeplm.parallel.mesh import batch_sharding
from sleeplm.training import step as train_lib
from sleeplm.training.checkpoint import Checkpointer
from sleeplm.training.evaluate import eval_sets, evaluate
from sleeplm.training.finetune import PretrainedStart
from sleeplm.training.optimizer import learning_rates
from sleeplm.training.preemption import Preempted, PreemptionGuard
from sleeplm.training.sharded import ShardedTraining
from sleeplm.training.step import model_batch
from sleeplm.training.tensorboard import EventLog


class NonFiniteTrainingError(FloatingPointError):
    """The training loss or gradient norm became NaN or infinite; the run stopped without saving that step."""


NonFiniteLossError = NonFiniteTrainingError  # the earlier name


def train_iterator(experiment: Experiment) -> grain.DatasetIterator:
    """This process's part of the training batches, as a checkpointable iterator.

    Global batch k holds examples [k B, (k + 1) B) of the seeded source (the same order for every N and every
    mesh); process p of P loads only its contiguous slice of B / P of them.
    """
    source = make_source(experiment.task, "train", seed=experiment.train.seed)
    batch, processes, index = experiment.train.batch_size, jax.process_count(), jax.process_index()
    if batch % processes:
        raise ValueError(f"train.batch_size={batch} is invalid: must be divisible by the {processes} processes")
    local = batch // processes
    indices = grain.MapDataset.range(len(source) // batch * local)
    dataset = indices.map(lambda i: source[(i // local) * batch + index * local + i % local])
    return iter(dataset.batch(local, drop_remainder=True).to_iter_dataset())


def last_timing(records) -> dict | None:
    """The run's wall time as of the last of `records` that has it: "seconds", summed over the invocations of a
    resumed run, and "timed_from_step" where the run is timed only from that step on (None: no record has it)."""
    timed = [record for record in records if "seconds" in record]
    return {key: timed[-1][key] for key in ("seconds", "timed_from_step") if key in timed[-1]} if timed else None


class MetricsLog:
    """Appends JSON records to metrics.jsonl; on resume, drops records past the restored step first.

    Train and eval records carry the run's wall time (`last_timing`); `timing_at_resume` reads it back from the
    restored step's records. Where they have none (the records were lost or edited), the run is timed from the
    restored step on and its records say so. Likewise "tokens", the real (non-padding) input tokens trained on
    through a train record's step, is read back from the restored step's train record (`tokens_at_resume`); where
    it has none, tokens are counted from the restored step on and records say "tokens_from_step"."""

    def __init__(self, path: Path, resume_step: int) -> None:
        self.path, self.enabled = path, jax.process_index() == 0  # one writer on multi-host runs
        self.timing_at_resume: dict = {"seconds": 0.0}
        self.tokens_at_resume: dict = {"tokens": 0}
        if not self.enabled:
            return
        kept = []
        if path.exists() and resume_step > 0:
            kept = [json.loads(line) for line in path.read_text().splitlines()]
            kept = [record for record in kept if record["step"] <= resume_step]
        if resume_step > 0:
            at_resume = last_timing(record for record in kept if record["step"] == resume_step)
            self.timing_at_resume = at_resume or {"seconds": 0.0, "timed_from_step": resume_step}
            counted = [r for r in kept if r["step"] == resume_step and r["kind"] == "train" and "tokens" in r]
            keys = ("tokens", "tokens_from_step")
            self.tokens_at_resume = (
                {key: counted[-1][key] for key in keys if key in counted[-1]}
                if counted
                else {"tokens": 0, "tokens_from_step": resume_step}
            )
        path.write_text("".join(json.dumps(record) + "\n" for record in kept))

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")


def _stepper(experiment: Experiment, mesh: Mesh | None, rules: str):
    """(init, step, put_batch, eval_fn) on one device, or sharded over `mesh` (batches from process-local data)."""
    config, train = experiment.config, experiment.train
    if mesh is None:
        put = lambda batch: jax.tree.map(jnp.asarray, model_batch(batch))
        # Committed to the device like the step's outputs, so the step compiles once, not again at step 2.
        init = lambda key: jax.device_put(train_lib.init_train_state(key, config, train), jax.devices()[0])
        return init, lambda state, batch: train_lib.train_step(state, batch, config, train), put, None
    sharded = ShardedTraining.create(config, train, mesh, rules, eval_batch_size=experiment.run.eval_batch_size)
    sharding = batch_sharding(mesh, sharded.rules)
    put = lambda batch: {
        key: jax.make_array_from_process_local_data(sharding, value) for key, value in model_batch(batch).items()
    }
    return sharded.init, sharded.step, put, sharded.eval


def run_training(experiment: Experiment, workdir: Path, **options) -> dict:
    """Trains `experiment` in `workdir` (see `_train`) as its one writer: another live process training the same
    workdir makes this fail at once naming it (`RunLockedError`); a lock left by a killed process is taken over with
    a warning. On a multi-process run, process 0 holds the lock."""
    with Workdir(workdir).writer_lock(enabled=jax.process_index() == 0):
        return _train(experiment, workdir, **options)


def _train(
    experiment: Experiment,
    workdir: Path,
    *,
    resume: bool = True,
    stop_at: int | None = None,
    mesh: Mesh | None = None,
    rules: str = "fsdp+tp",
    start: PretrainedStart | None = None,
) -> dict:
    """Trains `experiment` in `workdir` (checkpoints/, metrics.jsonl, experiment.json, the task's run files such
    as tokenizer.json); returns the last eval.

    `stop_at` ends the run early at that step (checkpointing it) as if interrupted, without changing the schedule.
    SIGTERM or SIGINT during the run finishes the current step, checkpoints it and raises `Preempted` (all
    processes of a multi-host run stop at the same step; see `sleeplm.training.preemption`). A NaN or infinite loss
    or gradient norm raises `NonFiniteTrainingError` before that step is saved.
    With a `mesh`, params, optimizer state and batches are sharded by `rules` (see `sleeplm.parallel`); a
    checkpoint restores onto whatever mesh the run has now. `start` (`sleeplm.training.finetune.fine_tuning`): the
    parameters of a run without checkpoints of its own come from a pretrained workdir (the optimizer starts fresh).
    """
    started = time.perf_counter()
    run_dir = Workdir(workdir)
    run_dir.path.mkdir(parents=True, exist_ok=True)
    config, train, run = experiment.config, experiment.train, experiment.run
    init, step_fn, put_batch, eval_fn = _stepper(experiment, mesh, rules)
    iterator = train_iterator(experiment)
    state = init(jax.random.key(train.seed))
    checkpoints = Checkpointer(run_dir.checkpoints_path, keep=run.keep_checkpoints)
    if resume and checkpoints.latest_step() is not None:
        state = checkpoints.restore(state, iterator, experiment)
    elif start is not None:
        state = state._replace(params=start.params(state.params))
    first = int(state.step)
    if jax.process_index() == 0:
        run_dir.write_experiment(experiment)
        save_run_files(experiment.task, run_dir.path, resumed=first > 0)  # e.g. tokenizer.json, to decode outputs
        hf = None if start is None else Workdir(start.workdir).hf_config()
        if hf is not None:  # what `sleeplm export` writes back
            run_dir.write_hf_config(hf)
    log = MetricsLog(run_dir.metrics_path, resume_step=first)
    sets = eval_sets(experiment)
    events = EventLog(run_dir.path, resume_step=first)
    rates = learning_rates(train)
    tokens = dict(log.tokens_at_resume)  # real input tokens (packed rows' `valid` ones) through the last flush
    stop = min(stop_at or train.steps, train.steps)

    pending: list[tuple[int, dict]] = []
    last_eval: dict = {}
    clock = time.perf_counter()

    def timing() -> dict:
        """The run's wall seconds so far, over all its invocations (see `MetricsLog`)."""
        resumed = log.timing_at_resume
        return resumed | {"seconds": resumed["seconds"] + time.perf_counter() - started}

    show = run.progress and jax.process_index() == 0
    bar = tqdm(total=train.steps, initial=first, disable=not show, desc=f"N={config.sleep.passes}")

    def flush(step: int) -> None:
        """Fetches the pending step metrics (one host sync per flush), checks them, writes them."""
        nonlocal clock
        if not pending:
            return
        values = jax.device_get([m for _, m in pending])
        elapsed, clock = time.perf_counter() - clock, time.perf_counter()
        now = timing()
        for (s, _), m in zip(pending, values, strict=True):
            for name, what in (("loss", "training loss"), ("grad_norm", "gradient norm")):
                if not np.isfinite(m[name]):
                    raise NonFiniteTrainingError(
                        f"{what} is {m[name]} at step {s}: stopped before saving; the last checkpoint in "
                        f"{checkpoints.directory} is step {checkpoints.latest_step()}"
                    )
        flushed = sum(int(m["tokens"]) for m in values)
        real_tokens_per_s = flushed / elapsed
        for (s, _), m in zip(pending, values, strict=True):
            tokens["tokens"] += int(m["tokens"])
            record = {"step": s, "kind": "train", "loss": float(m["loss"]), "grad_norm": float(m["grad_norm"])}
            log.write(record | tokens | now)
            if events.enabled:  # the rates step s trained at (the optimizer's count was s - 1)
                lr = {name: float(schedule(s - 1)) for name, schedule in rates.items()}
                events.scalars(s, {"loss": record["loss"], "grad_norm": record["grad_norm"]} | lr, "train")
        events.scalars(step, {"real_tokens_per_s": real_tokens_per_s}, "train")
        bar.set_postfix(loss=f"{float(values[-1]['loss']):.4f}", real_tok_s=f"{real_tokens_per_s:,.0f}")
        bar.update(step - bar.n)
        pending.clear()

    try:
        with PreemptionGuard() as guard:
            for step in range(first + 1, stop + 1):
                state, metrics = step_fn(state, put_batch(next(iterator)))
                pending.append((step, metrics))
                evaluating = step % run.eval_every == 0 or step == train.steps
                saving = step % run.checkpoint_every == 0
                logging = step % run.log_every == 0 or evaluating or saving or step == stop
                preempted = guard.should_stop(step, agree=logging)  # the same step on every process
                if logging or preempted:
                    flush(step)
                if evaluating:
                    last_eval = {"step": step, "kind": "eval"} | tokens
                    last_eval |= evaluate(state.params, sets, experiment, eval_fn)
                    log.write(last_eval | timing())
                    events.scalars(step, {k: v for k, v in last_eval.items() if k != "step"}, "eval")
                    if log.enabled:
                        shown = ", ".join(
                            f"{k} {v:.3f}" for k, v in last_eval.items() if k in ("loss", "accuracy", "exact")
                        )
                        bar.write(f"step {step}: {shown}")
                if saving or step == stop or preempted:
                    checkpoints.save(state, iterator, experiment)
                    events.flush()
                if preempted:
                    raise Preempted(step, guard.requested, checkpoints.directory)
    finally:
        bar.close()
        events.close()
    return last_eval
