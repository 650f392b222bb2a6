"""Orbax checkpoints of a run: train state (params, optimizer state, step), the grain iterator's position and the
experiment it belongs to, saved together and atomically (orbax writes to a temporary directory and renames),
keeping the last k. What inference shares (the checked step, restoring the parameters, weights-only checkpoints) is
`sleeplm.experiment.workdir.Checkpoints`, which `Checkpointer` extends."""

from __future__ import annotations

import grain
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from sleeplm.experiment.schema import Experiment
from sleeplm.experiment.workdir import CheckpointError, Checkpoints
from sleeplm.training.step import TrainState


class Checkpointer(Checkpoints):
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

    def restore(self, template: TrainState, iterator: grain.DatasetIterator, experiment: Experiment, step=None):
        """Restores the latest (or given) step into the structure of `template`; moves `iterator` to its position."""
        where = self.directory / str(self.latest_step() if step is None else step)
        if where.is_dir() and not (where / "data").exists():
            raise CheckpointError(
                f"checkpoint {where} holds weights only (no optimizer state or data position), e.g. a converted "
                "model: start a run from it in another workdir with `sleeplm train --init-from`"
            )
        step, where = self.checked_step(experiment, step)
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
        state = ocp.args.StandardRestore(abstract)
        return self.restore_items(step, where, state=state, data=grain.checkpoint.CheckpointRestore(iterator)).state

    def restore_state(self, experiment: Experiment, step=None) -> TrainState:
        """The latest (or given) step's parameters and step (no optimizer state, no data position)."""
        params, step = self.restore_params(experiment, step=step)
        return TrainState(params, None, jnp.asarray(step, jnp.int32))
