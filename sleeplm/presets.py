"""Experiments: a task, a model + sleep config, optimisation and run settings; named presets; dotted overrides.

`--sleep.window` is the one window knob: the task's window follows it, and the model's vocabulary follows the
task's tokenizer, so an experiment cannot be built inconsistent.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from typing import Any

from sleeplm.config import Config, Derived, ModelConfig, SleepConfig, check_positive_ints
from sleeplm.data import (
    ArithConfig,
    DepoConfig,
    Rule110Config,
    TaskConfig,
    TextConfig,
    task_named,
    task_of,
    vocabulary_size,
)
from sleeplm.train import TrainConfig

ALTERNATING4 = ("attn", "gdn", "attn", "gdn")


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

    @property
    def task_name(self) -> str:
        return task_of(self.task).name

    def to_json(self) -> dict:
        record = {"task_name": self.task_name, **dataclasses.asdict(self)}
        return json.loads(json.dumps(record))  # tuples -> lists, as a saved copy reads back


def experiment_from_json(record: dict) -> Experiment:
    """Rebuilds an Experiment from `Experiment.to_json()` (as saved in a run's experiment.json)."""
    task = task_named(record["task_name"])
    model = dict(record["config"]["model"])
    return Experiment(
        task.config_type(**record["task"]),
        Config(ModelConfig(**model), SleepConfig(**record["config"]["sleep"])),
        TrainConfig(**record["train"]),
        RunConfig(**record["run"]),
    )


def consistent(experiment: Experiment) -> Experiment:
    """Makes the task's window follow sleep.window and the model's vocabulary follow the task's tokenizer."""
    task = dataclasses.replace(experiment.task, window=experiment.config.sleep.window)
    model = dataclasses.replace(experiment.config.model, vocab_size=vocabulary_size(task))
    return dataclasses.replace(experiment, task=task, config=dataclasses.replace(experiment.config, model=model))


def _model(d_model: int, heads: int, layers=ALTERNATING4) -> ModelConfig:
    return ModelConfig(d_model=d_model, layers=layers, num_heads=heads)


PRESETS: dict[str, Experiment] = {
    # Paper scale (docs/method.md, "The paper's numbers"): 4 layers, d=256, L=24, batch 512, Muon 2e-3.
    "rule110": Experiment(
        Rule110Config(width=24, num_strings=4, steps=32),
        Config(_model(256, 4), SleepConfig(window=24, passes=1)),
        TrainConfig(steps=20_000, batch_size=512, warmup_steps=500),
        RunConfig(eval_every=500, eval_examples=2048, eval_batch_size=256, checkpoint_every=1000),
    ),
    # CPU scale: trains in minutes on 2 cores.
    "rule110-cpu": Experiment(
        Rule110Config(width=12, num_strings=4, steps=2),
        Config(_model(64, 4), SleepConfig(window=12, passes=1)),
        TrainConfig(steps=400, batch_size=64, warmup_steps=20),
        RunConfig(eval_every=50, eval_examples=512, eval_batch_size=256, checkpoint_every=100),
    ),
    "depo": Experiment(
        DepoConfig(max_nodes=75, min_nodes=75, name_length=2, name_tokens=50, max_hops=16, queries=10),
        Config(_model(512, 8, ALTERNATING4 * 2 + ("attn", "gdn")), SleepConfig(window=75, passes=1)),
        TrainConfig(steps=20_000, batch_size=256, warmup_steps=500),
        RunConfig(eval_every=500, eval_examples=1024, eval_batch_size=128, checkpoint_every=1000),
    ),
    "depo-cpu": Experiment(
        DepoConfig(max_nodes=24, min_nodes=16, name_length=1, name_tokens=32, max_hops=8, queries=8),
        Config(_model(128, 4), SleepConfig(window=16, passes=1)),
        TrainConfig(steps=600, batch_size=32, warmup_steps=30),
        RunConfig(eval_every=100, eval_examples=256, eval_batch_size=128, checkpoint_every=200),
    ),
    "arith": Experiment(
        ArithConfig(num_vars=64, modulus=10, min_ops=1, max_ops=8, windows=4),
        Config(_model(256, 4), SleepConfig(window=64, passes=1)),
        TrainConfig(steps=20_000, batch_size=256, warmup_steps=500),
        RunConfig(eval_every=500, eval_examples=2048, eval_batch_size=256, checkpoint_every=1000),
    ),
    "arith-cpu": Experiment(
        ArithConfig(num_vars=32, modulus=5, min_ops=1, max_ops=4, windows=3),
        Config(_model(128, 4), SleepConfig(window=32, passes=1)),
        TrainConfig(steps=600, batch_size=32, warmup_steps=30),
        RunConfig(eval_every=100, eval_examples=512, eval_batch_size=128, checkpoint_every=200),
    ),
    # Language modelling on text files (default: the Python standard library's .py files: 9.4M tokens at a vocabulary
    # of 4096, 8.0M at 32768). `--task.files 'corpus/**/*.jsonl'` trains on other text.
    # For an accelerator: 139M parameters (89M in the blocks, 50M in the embedding and the head), rows of 4 x 512
    # tokens. On the default corpus an epoch is 3729 rows (58 steps): meant for a larger corpus.
    "lm": Experiment(
        TextConfig(vocab_size=32768, windows=4),
        Config(
            ModelConfig(d_model=768, layers=ALTERNATING4 * 3, num_heads=12, mlp_dim=2048),
            SleepConfig(window=512, passes=1),
        ),
        TrainConfig(steps=20_000, batch_size=64, warmup_steps=1000),
        RunConfig(eval_every=1000, eval_examples=256, eval_batch_size=32, checkpoint_every=1000),
    ),
    # CPU scale: 2.1M parameters, rows of 4 x 64 tokens; about 2 s a step on 2 shared cores, so about 30 minutes.
    "lm-cpu": Experiment(
        TextConfig(vocab_size=4096, windows=4),
        Config(_model(128, 2), SleepConfig(window=64, passes=1)),
        TrainConfig(steps=800, batch_size=16, warmup_steps=40),
        RunConfig(eval_every=100, eval_examples=128, eval_batch_size=64, checkpoint_every=200),
    ),
}


def _convert(key: str, text: str, current: Any, annotation: Any) -> Any:
    """Parses `text` as the type of the field `key` (from its current value, else its annotation). "none" sets a
    field that may be None (a derived size is then derived again)."""
    optional = current is None or isinstance(current, Derived)
    kinds = [] if optional else [type(current)]
    kinds += [a for a in typing.get_args(annotation) if a is not type(None)] or [annotation]
    kind = kinds[0]
    if optional and text.lower() == "none":
        return None
    try:
        if kind is bool:
            if text.lower() not in ("true", "false", "1", "0"):
                raise ValueError
            return text.lower() in ("true", "1")
        if kind is tuple:
            return tuple(part.strip() for part in text.split(",") if part.strip())
        if kind in (int, float, str):
            return kind(text)
    except ValueError:
        raise ValueError(f"--{key} {text!r} is invalid: expected a value of type {kind.__name__}") from None
    raise ValueError(f"--{key} cannot be overridden from the command line (type {kind})")


SECTIONS = {
    "model": ("config", "model"),
    "sleep": ("config", "sleep"),
    "task": ("task",),
    "train": ("train",),
    "run": ("run",),
}


def apply_overrides(experiment: Experiment, overrides: dict[str, str]) -> Experiment:
    """Applies {"sleep.passes": "4", ...}; unknown sections/fields and bad values raise ValueError naming them.

    Each section's fields change together (one validation per section), so e.g. train.steps and
    train.warmup_steps may be lowered in the same call. The result is made `consistent`.
    """
    return consistent(with_overrides(experiment, overrides))


def with_overrides(experiment: Experiment, overrides: dict[str, str]) -> Experiment:
    """`apply_overrides` without making the result consistent (a pretrained model keeps its own vocabulary)."""
    by_section: dict[str, dict[str, str]] = {}
    for key, text in overrides.items():
        section, _, field = key.partition(".")
        if section not in SECTIONS or not field:
            raise ValueError(
                f"--{key} is invalid: overrides look like --SECTION.FIELD with SECTION in {sorted(SECTIONS)}"
            )
        if key == "task.window":
            raise ValueError("--task.window is not a setting: set --sleep.window, the task's window follows it")
        by_section.setdefault(section, {})[field] = text
    for section, changes in by_section.items():
        updated = overridden(_section(experiment, section), section, changes)
        path = SECTIONS[section]
        if len(path) == 2:
            updated = dataclasses.replace(experiment.config, **{path[1]: updated})
        experiment = dataclasses.replace(experiment, **{path[0]: updated})
    return experiment


def overridden(target: Any, section: str, changes: dict[str, str]) -> Any:
    """The config dataclass `target` of `section` with {field: text} parsed by each field's type and applied
    together; unknown fields and bad values raise ValueError naming --SECTION.FIELD."""
    fields = {f.name for f in dataclasses.fields(target)}
    parsed = {}
    for field, text in changes.items():
        key = f"{section}.{field}"
        if field not in fields:
            raise ValueError(f"--{key} is invalid: {section} has the fields {sorted(fields)}")
        hint = typing.get_type_hints(type(target))[field]
        parsed[field] = _convert(key, text, getattr(target, field), hint)
    return dataclasses.replace(target, **parsed)


def _section(experiment: Experiment, section: str):
    target = experiment
    for attribute in SECTIONS[section]:
        target = getattr(target, attribute)
    return target


def build_experiment(preset: str, overrides: dict[str, str] | None = None) -> Experiment:
    if preset not in PRESETS:
        raise ValueError(f"preset {preset!r} is unknown: choose one of {sorted(PRESETS)}")
    return apply_overrides(PRESETS[preset], overrides or {})
