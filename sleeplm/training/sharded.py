"""The train and eval steps of one experiment sharded over one mesh: the train state created directly in its
sharded layout, the steps jitted with in/out shardings (GSPMD) and traced with the rules in force."""

from __future__ import annotations

import dataclasses
import functools

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from sleeplm.config import Config
from sleeplm.experiment.schema import TrainConfig
from sleeplm.parallel.axes import Rules, rules_named, use_rules
from sleeplm.parallel.mesh import batch_sharding, check_divisible, effective_rules, train_state_shardings
from sleeplm.training.evaluate import eval_step
from sleeplm.training.step import TrainState, init_train_state, train_step


@dataclasses.dataclass(frozen=True)
class ShardedTraining:
    """Sharded init and train step of one experiment on one mesh."""

    mesh: Mesh
    rules: dict
    config: Config
    train: TrainConfig

    @classmethod
    def create(
        cls, config: Config, train: TrainConfig, mesh: Mesh, rules: str | Rules = "fsdp+tp", eval_batch_size=None
    ):
        rules = rules_named(rules) if isinstance(rules, str) else rules
        check_divisible(config, train.batch_size, mesh, rules, eval_batch_size)
        return cls(mesh, effective_rules(config, mesh, rules), config, train)

    @functools.cached_property
    def state_shardings(self) -> TrainState:
        abstract = jax.eval_shape(lambda key: init_train_state(key, self.config, self.train), jax.random.key(0))
        return train_state_shardings(abstract, self.mesh, self.rules, self.config)

    def init(self, key: jax.Array) -> TrainState:
        """The train state created directly in its sharded layout (never whole on one device)."""
        init = functools.partial(init_train_state, config=self.config, train=self.train)
        with jax.set_mesh(self.mesh), use_rules(self.rules):
            return jax.jit(init, out_shardings=self.state_shardings)(key)

    @functools.cached_property
    def _step(self):
        step = functools.partial(train_step, config=self.config, train=self.train)
        return jax.jit(
            step,
            in_shardings=(self.state_shardings, batch_sharding(self.mesh, self.rules)),
            out_shardings=(self.state_shardings, NamedSharding(self.mesh, P())),
            donate_argnums=(0,),
        )

    def step(self, state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        with jax.set_mesh(self.mesh), use_rules(self.rules):  # the activation constraints apply while tracing
            return self._step(state, batch)

    @functools.cached_property
    def _eval(self):
        return jax.jit(
            functools.partial(eval_step, config=self.config),
            in_shardings=(self.state_shardings.params, batch_sharding(self.mesh, self.rules)),
            out_shardings=NamedSharding(self.mesh, P()),  # small per-example results, readable on every process
        )

    def eval(self, params, batch: dict) -> dict:
        """`train.eval_step` with params and batch sharded (the batch must divide over the batch axes).

        `batch` is the whole global batch, the same on every process (held-out sets are generated identically
        everywhere); each process places only the slices its devices hold.
        """
        sharding = batch_sharding(self.mesh, self.rules)
        batch = {
            key: jax.make_array_from_callback(np.shape(x), sharding, lambda index, x=x: np.asarray(x)[index])
            for key, x in batch.items()
        }
        with jax.set_mesh(self.mesh), use_rules(self.rules):
            return self._eval(params, batch)
