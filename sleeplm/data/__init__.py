"""Task generators as grain random-access data sources, deterministic from a seed, and the registry of tasks.

Each example is a dict of numpy arrays: `inputs`, `targets` (next tokens), `loss_mask`, plus task metadata (the text
task's rows also carry `valid`, `document_start` and `position`, see `sleeplm.data.packing`).
A task is known to the rest of the package only through its `Task` here (see `sleeplm.data.task`).
This package is the only one that imports grain (the lent GPU machines do not have it).
"""

from __future__ import annotations

from pathlib import Path

import grain

from sleeplm.data.arith import ARITH, ArithConfig, ArithSource
from sleeplm.data.common import TaskSource, Vocabulary
from sleeplm.data.depo import DEPO, DepoConfig, DepoSource
from sleeplm.data.recall import RECALL, RecallConfig, RecallSource
from sleeplm.data.rule110 import RULE110, Rule110Config, Rule110Source
from sleeplm.data.task import Codec, Task, TaskConfig, vocabulary_size
from sleeplm.data.text import TEXT, TextConfig, TextSource
from sleeplm.experiment.files import atomic_write

TASKS: dict[str, Task] = {}


def register_task(task: Task) -> Task:
    """Adds `task` to TASKS, so experiments, training, evaluation and experiment records can use its config."""
    if not isinstance(task, Task):
        raise ValueError(f"register_task({task!r}) is invalid: expected a sleeplm.data.Task")
    if task.name in TASKS:
        raise ValueError(f"task name {task.name!r} is already registered: registered tasks are {sorted(TASKS)}")
    for other in TASKS.values():
        if other.config_type is task.config_type:
            raise ValueError(
                f"task {task.name!r} is invalid: its config type {task.config_type.__name__} already belongs to "
                f"task {other.name!r}"
            )
    TASKS[task.name] = task
    return task


register_task(RULE110)
register_task(DEPO)
register_task(ARITH)
register_task(TEXT)
register_task(RECALL)


def _registered() -> str:
    return ", ".join(f"{name} ({task.config_type.__name__})" for name, task in TASKS.items())


def task_of(config) -> Task:
    """The registered task whose config type is exactly `type(config)`."""
    for task in TASKS.values():
        if type(config) is task.config_type:
            return task
    raise ValueError(
        f"task config of type {type(config).__name__} is not registered: registered tasks are {_registered()}"
    )


def task_named(name: str) -> Task:
    """The registered task called `name` (an experiment record's "task_name")."""
    if name not in TASKS:
        raise ValueError(f"task_name={name!r} is unknown: registered tasks are {_registered()}")
    return TASKS[name]


def make_source(config, split: str = "train", seed: int = 0, size: int = 1 << 30, **kwargs) -> TaskSource:
    """The data source of a task config; `kwargs` are the source's options (e.g. `held_out_fraction`)."""
    return task_of(config).source_type(config, split=split, seed=seed, size=size, **kwargs)


def save_run_files(config, workdir: Path, resumed: bool) -> None:
    """Copies the task's run files (`Task.run_files`, e.g. the text task's tokenizer.json and corpus.json) into
    `workdir`. A resumed run must find the copies it started with: different ones mean the corpus or tokenizer
    changed since, so the rows after the resume point would not be those of an uninterrupted run, and it fails."""
    for name, path in task_of(config).run_files(config).items():
        target, content = Path(workdir) / name, Path(path).read_bytes()
        if resumed and target.exists() and target.read_bytes() != content:
            raise ValueError(
                f"{target} differs from {path}: the task's {name} changed since this run began, so it cannot resume "
                "on the data it started with; restore the corpus as it was, or start over (--fresh)"
            )
        atomic_write(target, content)


def batched(source: TaskSource, batch_size: int, seed: int, shuffle: bool = True) -> grain.MapDataset:
    """A grain MapDataset of batches (dicts of stacked arrays), deterministic from `seed`."""
    dataset = grain.MapDataset.source(source)
    if shuffle:
        dataset = dataset.shuffle(seed=seed)
    return dataset.batch(batch_size, drop_remainder=True)


__all__ = [
    "TASKS",
    "ArithConfig",
    "ArithSource",
    "Codec",
    "DepoConfig",
    "DepoSource",
    "RecallConfig",
    "RecallSource",
    "Rule110Config",
    "Rule110Source",
    "Task",
    "TaskConfig",
    "TaskSource",
    "TextConfig",
    "TextSource",
    "Vocabulary",
    "batched",
    "make_source",
    "register_task",
    "save_run_files",
    "task_named",
    "task_of",
    "vocabulary_size",
]
