"""Fine-tuning from a pretrained workdir (`sleeplm train --init-from WORKDIR`): the model config and parameters come
from WORKDIR (a converted checkpoint, or any run), optionally retrofitted with inserted blocks; the task, sleep,
train and run settings from the preset and overrides; the optimizer starts fresh. A run that has checkpoints of
its own resumes from them, never from WORKDIR again (`loop.run_training`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax

from sleeplm.config import Config, ModelConfig
from sleeplm.data import vocabulary_size
from sleeplm.data.text import TextConfig
from sleeplm.experiment.overrides import override_experiment
from sleeplm.experiment.schema import Experiment
from sleeplm.experiment.workdir import Workdir
from sleeplm.training.retrofit import insert_blocks, original_blocks, retrofit_params


@dataclasses.dataclass(frozen=True)
class PretrainedStart:
    """The parameters a run of `model` starts from: `workdir`'s latest checkpoint (of the experiment `source`), with
    the blocks `model` inserted at `insert_at` (positions in the source's stack) when given."""

    workdir: Path
    source: Experiment
    model: ModelConfig
    insert_at: tuple[int, ...] = ()

    def params(self, fresh: dict) -> dict:
        """The starting parameters, in the shapes, dtypes and shardings of `fresh` (the run's freshly initialised
        parameters, which also give the inserted blocks their initial values before they are silenced)."""
        template = fresh
        if self.insert_at:
            origin = original_blocks(len(self.source.config.model.layers), self.insert_at)
            kept = [(new, old) for new, old in enumerate(origin) if old is not None]
            blocks = {f"blocks_{old}": fresh["params"][f"blocks_{new}"] for new, old in kept}
            others = {name: value for name, value in fresh["params"].items() if not name.startswith("blocks_")}
            template = {"params": others | blocks}
        params, _ = Workdir(self.workdir).restore_params(self.source, template)
        if not self.insert_at:
            return params
        params = retrofit_params(params, fresh, self.model, self.insert_at)
        return jax.tree.map(lambda value, like: jax.device_put(value, like.sharding), params, fresh)


def fine_tuning(
    experiment: Experiment,
    overrides: dict[str, str],
    workdir: Path,
    insert_at: tuple[int, ...] = (),
    insert_kind: str = "gdn",
) -> tuple[Experiment, PretrainedStart]:
    """`experiment` (built from a preset and `overrides`) with the model of `workdir` (its `model.*` overrides
    applied, blocks of `insert_kind` inserted at `insert_at`), and where its parameters start.

    A text task given no tokenizer of its own (`task.tokenizer`) takes `workdir`'s: the pretrained model's
    vocabulary is its tokenizer's."""
    run = Workdir(workdir).check()
    source = run.experiment()
    model_overrides = {key: value for key, value in overrides.items() if key.startswith("model.")}
    model = override_experiment(dataclasses.replace(experiment, config=source.config), model_overrides).config.model
    if insert_at:
        model = insert_blocks(model, insert_at, insert_kind)
    task = experiment.task
    pretrained_tokenizer = isinstance(source.task, TextConfig) and run.tokenizer_path.is_file()
    if isinstance(task, TextConfig) and "task.tokenizer" not in overrides and pretrained_tokenizer:
        own = {name: getattr(source.task, name) for name in ("vocab_size", "eos_token", "pad_token")}
        task = dataclasses.replace(task, tokenizer=str(run.tokenizer_path.absolute()), **own)
    if vocabulary_size(task) > model.vocab_size:
        raise ValueError(
            f"task.vocab_size={vocabulary_size(task)} is invalid for the model of {workdir}: its vocabulary has "
            f"model.vocab_size={model.vocab_size} tokens"
        )
    tuned = dataclasses.replace(experiment, task=task, config=Config(model, experiment.config.sleep))
    return tuned, PretrainedStart(run.path, source, model, tuple(insert_at))
