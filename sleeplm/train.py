"""Training core: masked next-token loss, Muon + AdamW (SPEC §5), a jitted donated train step with gradient
accumulation, and evaluation metrics (label accuracy and whole-example exact match)."""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax

from sleeplm.config import Config, check_positive_ints
from sleeplm.sleep import forward, init_params


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings. `muon_lr` drives the hidden weight matrices, `adam_lr` everything else (embedding,
    norms, gates, decay parameters, short convolutions, output head)."""

    steps: int = 600
    batch_size: int = 64
    muon_lr: float = 2e-3
    adam_lr: float = 1e-3
    warmup_steps: int = 50
    weight_decay: float = 0.0
    clip_norm: float = 1.0
    accumulation: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        check_positive_ints(self, ("steps", "batch_size", "accumulation"), prefix="train.")
        if not isinstance(self.warmup_steps, int) or not 0 <= self.warmup_steps < self.steps:
            raise ValueError(f"train.warmup_steps={self.warmup_steps!r} is invalid: must be in [0, steps)")
        for name in ("muon_lr", "adam_lr", "clip_norm"):
            if not getattr(self, name) > 0:
                raise ValueError(f"train.{name}={getattr(self, name)!r} is invalid: must be > 0")
        if self.weight_decay < 0:
            raise ValueError(f"train.weight_decay={self.weight_decay!r} is invalid: must be >= 0")
        if self.batch_size % self.accumulation:
            raise ValueError(f"train.accumulation={self.accumulation} is invalid: must divide batch_size")


def is_hidden_matrix(path: tuple, leaf: jax.Array) -> bool:
    """Muon's parameters: 2-D kernels of the blocks' dense layers (not the embedding, head, gates a/b or conv)."""
    names = [str(getattr(key, "key", key)) for key in path]
    in_block = any(name.startswith("blocks_") for name in names)
    return in_block and leaf.ndim == 2 and names[-1] == "kernel" and names[-2] not in ("a", "b")


def make_optimizer(train: TrainConfig, params) -> optax.GradientTransformation:
    def schedule(peak):
        return optax.warmup_cosine_decay_schedule(0.0, peak, train.warmup_steps, train.steps, end_value=0.0)

    labels = jax.tree_util.tree_map_with_path(lambda p, x: "muon" if is_hidden_matrix(p, x) else "adam", params)
    return optax.chain(
        optax.clip_by_global_norm(train.clip_norm),
        optax.multi_transform(
            {
                "muon": optax.contrib.muon(schedule(train.muon_lr), weight_decay=train.weight_decay),
                "adam": optax.adamw(schedule(train.adam_lr), weight_decay=train.weight_decay),
            },
            labels,
        ),
    )


def masked_loss(params, batch: dict, config: Config) -> tuple[jax.Array, dict]:
    """Mean cross-entropy over the label positions (`loss_mask`), and per-position correctness."""
    logits = forward(params, batch["inputs"], config)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
    mask = batch["loss_mask"]
    loss = jnp.sum(losses * mask) / jnp.maximum(jnp.sum(mask), 1.0)
    correct = (jnp.argmax(logits, -1) == batch["targets"]) | (mask == 0)
    return loss, {"correct": correct}


class TrainState(NamedTuple):
    params: dict
    opt_state: optax.OptState
    step: jax.Array


def init_train_state(key: jax.Array, config: Config, train: TrainConfig) -> TrainState:
    params = init_params(key, config)
    return TrainState(params, make_optimizer(train, params).init(params), jnp.zeros((), jnp.int32))


@functools.partial(jax.jit, static_argnames=("config", "train"), donate_argnames=("state",))
def train_step(state: TrainState, batch: dict, config: Config, train: TrainConfig) -> tuple[TrainState, dict]:
    """One optimizer step on `batch` (leading dim batch_size), accumulating gradients over `train.accumulation`
    micro-batches with `lax.scan`. Returns the new state and {loss, grad_norm}."""
    micro = jax.tree.map(lambda x: x.reshape(train.accumulation, -1, *x.shape[1:]), batch)
    grad_fn = jax.value_and_grad(lambda p, b: masked_loss(p, b, config)[0])

    def accumulate(total, micro_batch):
        loss, grads = grad_fn(state.params, micro_batch)
        return jax.tree.map(jnp.add, total, (loss, grads)), None

    zeros = (jnp.zeros(()), jax.tree.map(jnp.zeros_like, state.params))
    (loss, grads), _ = lax.scan(accumulate, zeros, micro)
    loss, grads = jax.tree.map(lambda x: x / train.accumulation, (loss, grads))
    updates, opt_state = make_optimizer(train, state.params).update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    return TrainState(params, opt_state, state.step + 1), {"loss": loss, "grad_norm": optax.tree.norm(grads)}


@functools.partial(jax.jit, static_argnames=("config",))
def eval_step(params, batch: dict, config: Config) -> dict:
    """Per-example metrics: summed label loss, label count, labels right, whether every label is right, and
    per position whether the label there is right (`right`, False off the labels)."""
    logits = forward(params, batch["inputs"], config)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
    mask = batch["loss_mask"]
    right = (jnp.argmax(logits, -1) == batch["targets"]) * mask
    return {
        "loss_sum": jnp.sum(losses * mask, axis=-1),
        "labels": jnp.sum(mask, axis=-1),
        "labels_right": jnp.sum(right, axis=-1),
        "exact": jnp.all((right == mask), axis=-1),
        "right": right > 0,
    }
