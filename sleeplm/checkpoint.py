"""Orbax checkpoints of a run: train state (params, optimizer state, step), the grain iterator's position and the
experiment it belongs to, saved together and atomically (orbax writes to a temporary directory and renames),
keeping the last k."""

from __future__ import annotations

from pathlib import Path

import grain
import jax
import orbax.checkpoint as ocp

from sleeplm.presets import Experiment
from sleeplm.train import TrainState, init_train_state


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: corrupted, or written for a different experiment."""


def differences(saved: dict, current: dict, prefix: str = "") -> list[str]:
    """ "field: saved X, now Y" for every leaf that differs between two nested dicts (e.g. experiment records)."""
    if isinstance(saved, dict) and isinstance(current, dict):
        keys = sorted(set(saved) | set(current))
        return [d for k in keys for d in differences(saved.get(k), current.get(k), f"{prefix}{k}.")]
    return [] if saved == current else [f"{prefix[:-1]}: saved {saved!r}, now {current!r}"]


class Checkpointer:
    def __init__(self, directory: Path, keep: int) -> None:
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, state: TrainState, iterator: grain.DatasetIterator, experiment: Experiment) -> None:
        step = int(state.step)
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=grain.checkpoint.CheckpointSave(iterator),
                experiment=ocp.args.JsonSave(experiment.to_json()),
            ),
        )
        self.manager.wait_until_finished()

    def _checked_step(self, experiment: Experiment, step: int | None) -> tuple[int, Path]:
        """The latest (or given) step, after checking it was written for `experiment`."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"no checkpoint in {self.directory}")
        where = self.directory / str(step)
        try:
            saved = self.manager.restore(step, args=ocp.args.Composite(experiment=ocp.args.JsonRestore()))
        except Exception as error:
            raise CheckpointError(f"checkpoint {where} is unreadable ({type(error).__name__}: {error})") from error
        mismatch = [
            d for d in differences(saved.experiment, experiment.to_json()) if not d.startswith(("run.", "train.steps"))
        ]
        if mismatch:
            raise CheckpointError(
                f"checkpoint {where} was written for a different experiment: " + "; ".join(mismatch[:5])
            )
        return step, where

    def _restore(self, step: int, where: Path, **items):
        try:
            return self.manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as error:
            raise CheckpointError(f"checkpoint {where} is corrupted ({type(error).__name__}: {error})") from error

    def restore(self, template: TrainState, iterator: grain.DatasetIterator, experiment: Experiment, step=None):
        """Restores the latest (or given) step into the structure of `template`; moves `iterator` to its position."""
        step, where = self._checked_step(experiment, step)
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
        state = ocp.args.StandardRestore(abstract)
        return self._restore(step, where, state=state, data=grain.checkpoint.CheckpointRestore(iterator)).state

    def restore_state(self, experiment: Experiment, step=None) -> TrainState:
        """The latest (or given) step's train state alone (no data position), e.g. to generate or score with."""
        step, where = self._checked_step(experiment, step)
        abstract = jax.eval_shape(lambda: init_train_state(jax.random.key(0), experiment.config, experiment.train))
        return self._restore(step, where, state=ocp.args.StandardRestore(abstract)).state
