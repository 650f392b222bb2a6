"""The task protocol: everything the rest of the package needs to know about a task, in one frozen description.

A task module defines a config (a frozen dataclass with a `window` field, a `sequence_length` property, and either
a `vocab` property or a `vocab_size`), a `TaskSource` subclass that generates its examples, and a `Task` naming them
together with the extra held-out sets it evaluates on, the metrics it reports and the files a run keeps. Presets,
training, evaluation and the experiment record reach a task only through its `Task` (see the registry in
`sleeplm.data`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from sleeplm.data.common import TaskSource


class TaskConfig(Protocol):
    """What a task's config provides: the window its examples are laid out in, the length of `inputs`, and the
    tokenizer: a `vocab` (a `Vocabulary` of token strings), or a `vocab_size` when the task's tokenizer is not a
    Vocabulary (the text task's trained BPE). The window follows `sleep.window`, and the model's vocabulary size
    follows `vocabulary_size(config)`."""

    window: int

    @property
    def sequence_length(self) -> int: ...


def vocabulary_size(config: Any) -> int:
    """The vocabulary size a task config asks of the model: its `vocab_size`, else the size of its `vocab`."""
    return int(config.vocab_size) if hasattr(config, "vocab_size") else len(config.vocab)


def no_held_out_sets(config: Any) -> dict[str, dict[str, Any]]:
    """The default: no held-out set beside "all"."""
    return {}


def no_metrics(results: dict[str, np.ndarray], examples: dict[str, np.ndarray]) -> dict[str, float]:
    """The default: no metric beside loss, accuracy and exact match."""
    return {}


def no_run_files(config: Any) -> dict[str, Path]:
    """The default: a run keeps no file of the task's."""
    return {}


def config_as_trained(config: Any, workdir: Path, current_corpus: bool) -> Any:
    """The default: a task's config rebuilds the run's data as it is (generated tasks depend on nothing else)."""
    return config


@dataclasses.dataclass(frozen=True)
class Codec:
    """Text <-> token ids for a run's prompts and outputs (`sleeplm generate`, `sleeplm score`)."""

    encode: Callable[[str], list[int]]
    decode: Callable[[Sequence[int]], str]


def vocabulary_codec(config: Any, workdir: Path) -> Codec:
    """The default, for tasks with a `Vocabulary`: whitespace-separated token strings."""
    vocab = config.vocab
    return Codec(lambda text: [int(i) for i in vocab.encode(text.split())], lambda ids: " ".join(vocab.decode(ids)))


@dataclasses.dataclass(frozen=True)
class Task:
    """A task: `name` (its "task_name" in experiment records), `config_type`, `source_type`, and for evaluation

    - `held_out_sets(config)`: the extra held-out sets beside "all", as {set name: keyword arguments of the source}
      (the source options select the subset; the config, hence the vocabulary, stays the training one);
    - `metrics(results, examples)`: task metrics from the "all" set's per-example eval results (the dict
      `sleeplm.training.evaluate.eval_step` returns, concatenated over batches, numpy) and its examples (inputs,
      targets, loss_mask and the task's metadata, concatenated likewise);

    and for the run, `run_files(config)`: {name: path} of files a run's workdir keeps a copy of (the text task's
    tokenizer.json, with which a run's outputs are decoded), see `sleeplm.data.save_run_files`; and
    `codec(config, workdir)`: how a run's prompts become token ids and its outputs text; `run_config(config,
    workdir, current_corpus)`: the config with which a finished run's data is rebuilt (e.g. by `sleeplm eval`), from
    the run's own files (the text task's tokenizer.json, and its corpus.json unless `current_corpus`).
    """

    name: str
    config_type: type
    source_type: type[TaskSource]
    held_out_sets: Callable[[Any], dict[str, dict[str, Any]]] = no_held_out_sets
    metrics: Callable[[dict[str, np.ndarray], dict[str, np.ndarray]], dict[str, float]] = no_metrics
    run_files: Callable[[Any], dict[str, Path]] = no_run_files
    codec: Callable[[Any, Path], Codec] = vocabulary_codec
    run_config: Callable[[Any, Path, bool], Any] = config_as_trained

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
        missing += ["sequence_length"] * (not hasattr(config_type, "sequence_length"))
        has_size = "vocab_size" in fields or hasattr(config_type, "vocab_size")
        missing += ["vocab"] * (not (hasattr(config_type, "vocab") or has_size))
        if missing:
            raise ValueError(
                f"Task.config_type={config_type.__name__} of task {self.name!r} is invalid: it lacks {missing} "
                "(a task config has a `window` field, a `sequence_length` property, and a `vocab` property or a "
                "`vocab_size`)"
            )
        if not (isinstance(self.source_type, type) and issubclass(self.source_type, TaskSource)):
            raise ValueError(
                f"Task.source_type={self.source_type!r} of task {self.name!r} is invalid: must be a TaskSource subclass"
            )
