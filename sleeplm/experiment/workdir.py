"""A run directory (`Workdir`): every file in it by name (`files.py` holds the names), its experiment record, its
checkpoints' parameters for inference (`Checkpoints`, shared with training's `Checkpointer`), and what training and
inference share about it (`CheckpointError`, `differences`).

Checkpoints are orbax ones: item "state" is a train state (params, opt_state, step) saved with `StandardSave`,
item "experiment" the experiment record, and a training checkpoint also has item "data" (the grain iterator's
position). A weights checkpoint (`Checkpoints.save_weights`, e.g. a converted model) has no optimizer state and no
"data": eval, generate, score, export and `train --init-from` read it; it is no run to resume.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from sleeplm.core.parameters import init_params
from sleeplm.data import task_of
from sleeplm.experiment.files import (
    CHECKPOINTS,
    CORPUS,
    EXPERIMENT,
    HF_CONFIG,
    METRICS,
    TOKENIZER,
    WRITER_LOCK,
    atomic_write,
    eval_name,
)
from sleeplm.experiment.lock import RunLock
from sleeplm.experiment.schema import Experiment, experiment_from_json


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: corrupted, or written for a different experiment."""


class NotARunError(ValueError):
    """A directory that is not a sleeplm run directory (a file every run has is missing)."""


def differences(saved: dict, current: dict, prefix: str = "") -> list[str]:
    """ "field: saved X, now Y" for every leaf that differs between two nested dicts (e.g. experiment records)."""
    if isinstance(saved, dict) and isinstance(current, dict):
        keys = sorted(set(saved) | set(current))
        return [d for k in keys for d in differences(saved.get(k), current.get(k), f"{prefix}{k}.")]
    return [] if saved == current else [f"{prefix[:-1]}: saved {saved!r}, now {current!r}"]


class WeightsState(NamedTuple):
    """The layout of a checkpoint's "state" item (training's `TrainState`): a weights checkpoint's has no
    optimizer state."""

    params: Any
    opt_state: Any
    step: Any


class Checkpoints:
    """A run's checkpoints directory: which steps it holds, each checked against the experiment it was written
    for, and the parameters of one of them (training's `Checkpointer` adds the full train state and data
    position)."""

    def __init__(self, directory: Path, keep: int) -> None:
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save_weights(self, params: dict, experiment: Experiment, step: int = 0) -> None:
        """Saves parameters without optimizer state or data position (a starting point, not a run to resume)."""
        state = WeightsState(params, None, jnp.asarray(step, jnp.int32))
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), experiment=ocp.args.JsonSave(experiment.to_json())
            ),
        )
        self.manager.wait_until_finished()

    def checked_step(self, experiment: Experiment, step: int | None) -> tuple[int, Path]:
        """The latest (or given) step, after checking it was written for `experiment` (run settings and
        train.steps aside)."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"no checkpoint in {self.directory}")
        where = self.directory / str(step)
        try:
            saved = self.manager.restore(step, args=ocp.args.Composite(experiment=ocp.args.JsonRestore()))
        except Exception as error:
            raise CheckpointError(f"checkpoint {where} is unreadable ({type(error).__name__}: {error})") from error
        changes = differences(saved.experiment, experiment.to_json())
        mismatch = [d for d in changes if not d.startswith(("run.", "train.steps"))]
        if mismatch:
            raise CheckpointError(
                f"checkpoint {where} was written for a different experiment: " + "; ".join(mismatch[:5])
            )
        return step, where

    def restore_items(self, step: int, where: Path, **items):
        try:
            return self.manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as error:
            raise CheckpointError(f"checkpoint {where} is corrupted ({type(error).__name__}: {error})") from error

    def restore_params(self, experiment: Experiment, template: dict | None = None, step=None) -> tuple[dict, int]:
        """The latest (or given) step's parameters and step, nothing else (of a run's checkpoint or a weights
        one). `template`: a params tree whose shapes, dtypes and shardings they are restored into (default: the
        experiment's parameters on the first device)."""
        step, where = self.checked_step(experiment, step)
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        if template is None:
            shapes = jax.eval_shape(lambda: init_params(jax.random.key(0), experiment.config))
            abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), shapes)
        else:
            abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
        item = {"params": abstract, "step": jax.ShapeDtypeStruct((), jnp.int32, sharding=device)}
        restore = ocp.args.PyTreeRestore(
            item, restore_args=ocp.checkpoint_utils.construct_restore_args(item), partial_restore=True
        )
        restored = self.restore_items(step, where, state=restore).state
        return restored["params"], int(restored["step"])


@dataclasses.dataclass(frozen=True)
class Workdir:
    """A run directory: `sleeplm train` writes one, `sleeplm convert` builds one; eval, generate, score, export,
    plot and `train --init-from` read one. It owns every file name in it (see `files.py`)."""

    path: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))

    # ------------------------------------------------------------------------------------------------ file names

    @property
    def experiment_path(self) -> Path:
        return self.path / EXPERIMENT

    @property
    def checkpoints_path(self) -> Path:
        return self.path / CHECKPOINTS

    @property
    def metrics_path(self) -> Path:
        return self.path / METRICS

    @property
    def tokenizer_path(self) -> Path:
        return self.path / TOKENIZER

    @property
    def corpus_path(self) -> Path:
        return self.path / CORPUS

    @property
    def hf_config_path(self) -> Path:
        return self.path / HF_CONFIG

    @property
    def lock_path(self) -> Path:
        return self.path / WRITER_LOCK

    def eval_path(self, step: int) -> Path:
        return self.path / eval_name(step)

    # ------------------------------------------------------------------------------------------------ reading

    def is_run(self) -> bool:
        """Whether the directory holds what every run has: an experiment record and a checkpoints directory."""
        return self.experiment_path.is_file() and self.checkpoints_path.is_dir()

    def check(self, *, checkpoints: bool = True) -> Workdir:
        """Self, after checking it is a run directory; NotARunError naming the first missing file otherwise."""
        needed = [self.experiment_path] + ([self.checkpoints_path] if checkpoints else [])
        for path in needed:
            if not path.exists():
                raise NotARunError(
                    f"{path} does not exist: {self.path} is not a sleeplm run directory (one `sleeplm train` or "
                    f"`sleeplm convert` wrote, with {EXPERIMENT} and {CHECKPOINTS}/)"
                )
        return self

    def experiment(self) -> Experiment:
        """The run's experiment record (NotARunError naming experiment.json when there is none)."""
        self.check(checkpoints=False)
        try:
            record = json.loads(self.experiment_path.read_text())
        except ValueError as error:
            raise NotARunError(f"{self.experiment_path} is not JSON ({error})") from error
        return experiment_from_json(record)

    def record(self) -> dict:
        """The experiment record as saved (JSON), without rebuilding the experiment."""
        self.check(checkpoints=False)
        return json.loads(self.experiment_path.read_text())

    def checkpoints(self, keep: int = 1) -> Checkpoints:
        return Checkpoints(self.checkpoints_path, keep=keep)

    def restore_params(
        self, experiment: Experiment | None = None, template: dict | None = None, step: int | None = None
    ) -> tuple[dict, int]:
        """A checkpoint's parameters and step (the latest, or `step`), checked against the run's experiment."""
        self.check()
        experiment = self.experiment() if experiment is None else experiment
        return self.checkpoints(experiment.run.keep_checkpoints).restore_params(experiment, template, step)

    def hf_config(self) -> dict | None:
        """The converted checkpoint's config.json kept in the run (None when the run has none)."""
        return json.loads(self.hf_config_path.read_text()) if self.hf_config_path.is_file() else None

    def task_config(self, experiment: Experiment | None = None, current_corpus: bool = False):
        """The run's task config as its data is rebuilt after training (e.g. by `sleeplm eval`): a text task's
        always with the run's own tokenizer.json, and on the corpus its corpus.json recorded (it fails naming the
        changed files when the corpus changed since) unless `current_corpus`."""
        experiment = self.experiment() if experiment is None else experiment
        return task_of(experiment.task).run_config(experiment.task, self.path, current_corpus)

    def codec(self, experiment: Experiment | None = None):
        """How prompts become token ids and outputs text for this run (a text run's: its tokenizer.json)."""
        experiment = self.experiment() if experiment is None else experiment
        return task_of(experiment.task).codec(experiment.task, self.path)

    # ------------------------------------------------------------------------------------------------ writing

    def writer_lock(self, enabled: bool = True, command: str | None = None):
        """The one-writer lock of the run (`sleeplm.experiment.lock.RunLock` on writer.lock, creating the directory),
        to hold while training writes it: entering fails at once with `RunLockedError` naming the live holder (host,
        pid, since when), and takes over a lock a killed process left, with a warning. `enabled=False` (every
        process of a multi-process run but process 0, which alone writes the run) gives a block that locks
        nothing."""
        if not enabled:
            return contextlib.nullcontext()
        return RunLock(self.lock_path, command)

    def write_experiment(self, experiment: Experiment) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write(self.experiment_path, json.dumps(experiment.to_json(), indent=2) + "\n")

    def write_hf_config(self, config: dict) -> None:
        atomic_write(self.hf_config_path, json.dumps(config, indent=2) + "\n")

    def write_eval(self, step: int, metrics: dict) -> Path:
        return atomic_write(self.eval_path(step), json.dumps(metrics, indent=2) + "\n")
