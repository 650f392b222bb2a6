"""The task protocol: everything the rest of the package needs to know about a task, in one frozen description.

A task module defines a config (a frozen dataclass with a `window` field and `sequence_length` and `vocab`
properties), a `TaskSource` subclass that generates its examples, and a `Task` naming them together with the extra
held-out sets it evaluates on and the metrics it reports. Presets, training, evaluation and the experiment record
reach a task only through its `Task` (see the registry in `sleeplm.data`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np

from sleeplm.data.common import TaskSource, Vocabulary


class TaskConfig(Protocol):
    """What a task's config provides: the window its examples are laid out in, the length of `inputs`, the
    tokenizer. The window follows `sleep.window`, and the model's vocabulary size follows `vocab`."""

    window: int

    @property
    def sequence_length(self) -> int: ...

    @property
    def vocab(self) -> Vocabulary: ...


def no_held_out_sets(config: Any) -> dict[str, dict[str, Any]]:
    """The default: no held-out set beside "all"."""
    return {}


def no_metrics(results: dict[str, np.ndarray], examples: dict[str, np.ndarray]) -> dict[str, float]:
    """The default: no metric beside loss, accuracy and exact match."""
    return {}


@dataclasses.dataclass(frozen=True)
class Task:
    """A task: `name` (its "task_name" in experiment records), `config_type`, `source_type`, and for evaluation

    - `held_out_sets(config)`: the extra held-out sets beside "all", as {set name: keyword arguments of the source}
      (the source options select the subset; the config, hence the vocabulary, stays the training one);
    - `metrics(results, examples)`: task metrics from the "all" set's per-example eval results (the dict
      `sleeplm.train.eval_step` returns, concatenated over batches, numpy) and its examples (inputs, targets,
      loss_mask and the task's metadata, concatenated likewise).
    """

    name: str
    config_type: type
    source_type: type[TaskSource]
    held_out_sets: Callable[[Any], dict[str, dict[str, Any]]] = no_held_out_sets
    metrics: Callable[[dict[str, np.ndarray], dict[str, np.ndarray]], dict[str, float]] = no_metrics

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"Task.name={self.name!r} is invalid: must be a non-empty string")
        config_type = self.config_type
        if not (isinstance(config_type, type) and dataclasses.is_dataclass(config_type)) or not (
            config_type.__dataclass_params__.frozen
        ):
            raise ValueError(
                f"Task.config_type={config_type!r} of task {self.name!r} is invalid: must be a frozen dataclass"
            )
        fields = {field.name for field in dataclasses.fields(config_type)}
        missing = ["window"] * ("window" not in fields)
        missing += [name for name in ("sequence_length", "vocab") if not hasattr(config_type, name)]
        if missing:
            raise ValueError(
                f"Task.config_type={config_type.__name__} of task {self.name!r} is invalid: it lacks {missing} "
                "(a task config has a `window` field and `sequence_length` and `vocab` properties)"
            )
        if not (isinstance(self.source_type, type) and issubclass(self.source_type, TaskSource)):
            raise ValueError(
                f"Task.source_type={self.source_type!r} of task {self.name!r} is invalid: must be a TaskSource subclass"
            )
