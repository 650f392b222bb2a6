"""The training step: masked next-token loss and a jitted, donated train step with gradient accumulation."""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax

from sleeplm.config import Config
from sleeplm.core.forward import forward
from sleeplm.core.parameters import init_params
from sleeplm.experiment.schema import TrainConfig
from sleeplm.training.optimizer import make_optimizer

# What a batch gives the model: always inputs, targets and loss_mask; packed rows also `valid` and `document_start`
# (see `sleeplm.core.forward.forward`).
MODEL_KEYS = ("inputs", "targets", "loss_mask")


PACKING_KEYS = ("valid", "document_start")


def model_batch(batch: dict) -> dict:
    """The arrays of `batch` that the train and eval steps read (task metadata stays behind)."""
    return {key: batch[key] for key in MODEL_KEYS + PACKING_KEYS if key in batch}


def model_logits(params, batch: dict, config: Config) -> jax.Array:
    return forward(params, batch["inputs"], config, **{key: batch[key] for key in PACKING_KEYS if key in batch})


def label_loss_sum(params, batch: dict, config: Config) -> tuple[jax.Array, jax.Array]:
    """Cross-entropy summed over the label positions (`loss_mask`), and the number of labels."""
    losses = optax.softmax_cross_entropy_with_integer_labels(model_logits(params, batch, config), batch["targets"])
    return jnp.sum(losses * batch["loss_mask"]), jnp.sum(batch["loss_mask"])


def masked_loss(params, batch: dict, config: Config) -> jax.Array:
    """Mean cross-entropy over the label positions (0 for a batch without labels)."""
    total, labels = label_loss_sum(params, batch, config)
    return total / jnp.maximum(labels, 1.0)


class TrainState(NamedTuple):
    params: dict
    opt_state: optax.OptState
    step: jax.Array


def init_train_state(key: jax.Array, config: Config, train: TrainConfig) -> TrainState:
    params = init_params(key, config)
    return TrainState(params, make_optimizer(train, config).init(params), jnp.zeros((), jnp.int32))


@functools.partial(jax.jit, static_argnames=("config", "train"), donate_argnames=("state",))
def train_step(state: TrainState, batch: dict, config: Config, train: TrainConfig) -> tuple[TrainState, dict]:
    """One optimizer step on `batch` (leading dim batch_size), accumulating gradients over `train.accumulation`
    micro-batches with `lax.scan`: label losses and their gradients are summed over the micro-batches and divided
    by the batch's label count, so the step equals one on the whole batch whatever the labels per micro-batch.
    Returns the new state and {loss, grad_norm, tokens}: `tokens` counts the batch's real input tokens (a packed
    row's `valid` ones; every input of the other tasks), as int32."""
    micro = jax.tree.map(lambda x: x.reshape(train.accumulation, -1, *x.shape[1:]), batch)
    grad_fn = jax.value_and_grad(lambda p, b: label_loss_sum(p, b, config), has_aux=True)

    def accumulate(total, micro_batch):
        (loss_sum, labels), grads = grad_fn(state.params, micro_batch)
        return jax.tree.map(jnp.add, total, (loss_sum, labels, grads)), None

    zeros = (jnp.zeros(()), jnp.zeros(()), jax.tree.map(jnp.zeros_like, state.params))
    (loss_sum, labels, grads), _ = lax.scan(accumulate, zeros, micro)
    loss, grads = jax.tree.map(lambda x: x / jnp.maximum(labels, 1.0), (loss_sum, grads))
    updates, opt_state = make_optimizer(train, config).update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    tokens = jnp.sum(batch["valid"], dtype=jnp.int32) if "valid" in batch else jnp.int32(batch["inputs"].size)
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), "tokens": tokens}
    return TrainState(params, opt_state, state.step + 1), metrics
