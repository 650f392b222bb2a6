"""The experiment record: a task config, the model and sleep config, optimisation and run settings, and its JSON
form (a run's experiment.json). Training writes it; evaluation, inference and conversion read it.

`align_task_and_model` makes an experiment consistent: the task's window follows `sleep.window` (the one window
knob), and the model's vocabulary follows the task's tokenizer.
"""

from __future__ import annotations

import dataclasses
import json

from sleeplm.config import Config, ModelConfig, SleepConfig, check_bools, check_numbers, check_positive_ints
from sleeplm.core.checks import check_config
from sleeplm.data import TaskConfig, task_named, task_of, vocabulary_size
from sleeplm.experiment.files import EXPERIMENT


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings. `muon_lr` drives the hidden weight matrices, `adam_lr` everything else (embedding,
    norms, gates, decay parameters, short convolutions, output head). `trainable`: "all" parameters, or only the
    "new" ones (declared new: the blocks a retrofit inserted, `ModelConfig.inserted_blocks`); the others then get
    zero updates and count for nothing in gradient clipping."""

    steps: int = 600
    batch_size: int = 64
    muon_lr: float = 2e-3
    adam_lr: float = 1e-3
    warmup_steps: int = 50
    weight_decay: float = 0.0
    clip_norm: float = 1.0
    accumulation: int = 1
    seed: int = 0
    trainable: str = "all"

    def __post_init__(self) -> None:
        check_positive_ints(self, ("steps", "batch_size", "accumulation"), prefix="train.")
        if not isinstance(self.warmup_steps, int) or not 0 <= self.warmup_steps < self.steps:
            raise ValueError(f"train.warmup_steps={self.warmup_steps!r} is invalid: must be in [0, steps)")
        check_numbers(self, ("muon_lr", "adam_lr", "clip_norm"), prefix="train.")
        check_numbers(self, ("weight_decay",), prefix="train.", strict=False)
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ValueError(f"train.seed={self.seed!r} is invalid: must be an integer")
        if self.batch_size % self.accumulation:
            raise ValueError(f"train.accumulation={self.accumulation} is invalid: must divide batch_size")
        if not isinstance(self.trainable, str) or self.trainable not in TRAINABLE:
            raise ValueError(f"train.trainable={self.trainable!r} is invalid: allowed are {TRAINABLE}")


TRAINABLE = ("all", "new")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """How a run reports and saves: evaluation cadence and size, logging, checkpoints."""

    eval_every: int = 100
    eval_examples: int = 512
    eval_batch_size: int = 128
    log_every: int = 10
    checkpoint_every: int = 200
    keep_checkpoints: int = 2
    progress: bool = True

    def __post_init__(self) -> None:
        names = ("eval_every", "eval_examples", "eval_batch_size", "log_every", "checkpoint_every", "keep_checkpoints")
        check_positive_ints(self, names, prefix="run.")
        check_bools(self, ("progress",), prefix="run.")
        if self.eval_examples % self.eval_batch_size:
            raise ValueError(
                f"run.eval_examples={self.eval_examples} is invalid: must be a multiple of "
                f"run.eval_batch_size={self.eval_batch_size}"
            )


@dataclasses.dataclass(frozen=True)
class Experiment:
    """A task config (of a registered task, see `sleeplm.data.TASKS`), the model and sleep config, optimisation
    and run settings."""

    task: TaskConfig
    config: Config
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    run: RunConfig = dataclasses.field(default_factory=RunConfig)

    def __post_init__(self) -> None:
        task_of(self.task)  # an unregistered task config fails here, naming the registered tasks
        check_config(self.config)

    @property
    def task_name(self) -> str:
        return task_of(self.task).name

    def to_json(self) -> dict:
        record = {"task_name": self.task_name, **dataclasses.asdict(self)}
        return json.loads(json.dumps(record))  # tuples -> lists, as a saved copy reads back


def experiment_from_json(record: dict) -> Experiment:
    """Rebuilds an Experiment from `Experiment.to_json()` (as saved in a run's experiment.json). A record that was
    edited by hand fails naming what is wrong: a missing or unknown section or field, an unregistered task, a bad
    value (each config's own checks)."""
    if isinstance(record, dict) and "task_name" in record:  # the task first: its name says what the rest holds
        if not isinstance(record["task_name"], str):
            raise ValueError(f"{EXPERIMENT} task_name={record['task_name']!r} is invalid: must be a task's name")
        task_named(record["task_name"])
    _check_keys(record, EXPERIMENT, ("task_name", "task", "config", "train", "run"))
    _check_keys(record["config"], f"{EXPERIMENT} config", ("model", "sleep"))
    task = task_named(record["task_name"])
    sections = {
        "task": (task.config_type, record["task"]),
        "config.model": (ModelConfig, record["config"]["model"]),
        "config.sleep": (SleepConfig, record["config"]["sleep"]),
        "train": (TrainConfig, record["train"]),
        "run": (RunConfig, record["run"]),
    }
    built = {}
    for section, (config_type, fields) in sections.items():
        names = [field.name for field in dataclasses.fields(config_type) if field.init]
        required = [
            field.name
            for field in dataclasses.fields(config_type)
            if field.init and field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING
        ]
        _check_keys(fields, f"{EXPERIMENT} {section}", names, required)
        built[section] = config_type(**fields)
    return Experiment(
        built["task"],
        Config(built["config.model"], built["config.sleep"]),
        built["train"],
        built["run"],
    )


def _check_keys(record, where: str, allowed, required=None) -> None:
    """`record` must be a JSON object with every `required` key (default: all of `allowed`) and no other."""
    if not isinstance(record, dict):
        raise ValueError(f"{where} is invalid: must be an object with the fields {sorted(allowed)}")
    missing = [key for key in (allowed if required is None else required) if key not in record]
    if missing:
        raise ValueError(f"{where} is invalid: it lacks the fields {missing} (the fields are {sorted(allowed)})")
    unknown = [key for key in record if key not in allowed]
    if unknown:
        raise ValueError(f"{where} is invalid: unknown fields {unknown} (allowed are {sorted(allowed)})")


def align_task_and_model(experiment: Experiment) -> Experiment:
    """Makes the task's window follow sleep.window and the model's vocabulary follow the task's tokenizer."""
    task = dataclasses.replace(experiment.task, window=experiment.config.sleep.window)
    model = dataclasses.replace(experiment.config.model, vocab_size=vocabulary_size(task))
    return dataclasses.replace(experiment, task=task, config=dataclasses.replace(experiment.config, model=model))
