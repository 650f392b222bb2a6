"""Orbax checkpoints of a run: train state (params, optimizer state, step), the grain iterator's position and the
experiment it belongs to, saved together and atomically (orbax writes to a temporary directory and renames),
keeping the last k. A weights checkpoint (`save_weights`, e.g. a converted pretrained model) holds the parameters,
step and experiment alone: eval, generate, score and `train --init-from` read it; it is no run to resume."""

from __future__ import annotations

from pathlib import Path

import grain
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from sleeplm.core.parameters import init_params
from sleeplm.experiment.schema import Experiment, experiment_from_json
from sleeplm.experiment.workdir import CheckpointError, differences
from sleeplm.training.step import TrainState


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

    def save_weights(self, params: dict, experiment: Experiment, step: int = 0) -> None:
        """Saves parameters without optimizer state or data position (a starting point, not a run to resume)."""
        state = TrainState(params, None, jnp.asarray(step, jnp.int32))
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), experiment=ocp.args.JsonSave(experiment.to_json())
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
        changes = differences(_filled(saved.experiment), experiment.to_json())
        mismatch = [d for d in changes if not d.startswith(("run.", "train.steps"))]
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
        where = self.directory / str(self.latest_step() if step is None else step)
        if where.is_dir() and not (where / "data").exists():
            raise CheckpointError(
                f"checkpoint {where} holds weights only (no optimizer state or data position), e.g. a converted "
                "model: start a run from it in another workdir with `sleeplm train --init-from`"
            )
        step, where = self._checked_step(experiment, step)
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
        state = ocp.args.StandardRestore(abstract)
        return self._restore(step, where, state=state, data=grain.checkpoint.CheckpointRestore(iterator)).state

    def restore_params(self, experiment: Experiment, template: dict | None = None, step=None) -> tuple[dict, int]:
        """The latest (or given) step's parameters and step, nothing else (of a run's checkpoint or a weights
        one). `template`: a params tree whose shapes, dtypes and shardings they are restored into (default: the
        experiment's parameters on the first device)."""
        step, where = self._checked_step(experiment, step)
        if template is None:
            device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
            shapes = jax.eval_shape(lambda: init_params(jax.random.key(0), experiment.config))
            abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), shapes)
        else:
            abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
        replicated = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        item = {"params": abstract, "step": jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated)}
        restore = ocp.args.PyTreeRestore(
            item, restore_args=ocp.checkpoint_utils.construct_restore_args(item), partial_restore=True
        )
        restored = self._restore(step, where, state=restore).state
        return restored["params"], int(restored["step"])

    def restore_state(self, experiment: Experiment, step=None) -> TrainState:
        """The latest (or given) step's parameters and step (no optimizer state, no data position), e.g. to
        evaluate, generate or score with."""
        params, step = self.restore_params(experiment, step=step)
        return TrainState(params, None, jnp.asarray(step, jnp.int32))


def _filled(record: dict) -> dict:
    """An experiment record as this version writes it: fields added since it was saved take their defaults."""
    try:
        return experiment_from_json(record).to_json()
    except (TypeError, ValueError, KeyError):
        return record
