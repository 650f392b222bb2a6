"""Training core: masked next-token loss, Muon + AdamW (docs/method.md, "Training"), a jitted donated train step
with gradient accumulation, and evaluation metrics (label accuracy and whole-example exact match)."""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax

from sleeplm.config import Config, check_positive_ints
from sleeplm.model.params import is_annotated
from sleeplm.sleep import forward, init_params, param_annotations


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings. `muon_lr` drives the hidden weight matrices, `adam_lr` everything else (embedding,
    norms, gates, decay parameters, short convolutions, output head). `trainable`: "all" parameters, or only the
    "new" ones (declared new: the blocks a retrofit inserted, `ModelConfig.inserted_blocks`); the others then get
    zero updates and count for nothing in gradient clipping."""

    steps: int = 600
    batch_size: int = 64
    muon_lr: float = 2e-3
    adam_lr: float = 1e-3
    warmup_steps: int = 50
    weight_decay: float = 0.0
    clip_norm: float = 1.0
    accumulation: int = 1
    seed: int = 0
    trainable: str = "all"

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
        if self.trainable not in TRAINABLE:
            raise ValueError(f"train.trainable={self.trainable!r} is invalid: allowed are {TRAINABLE}")


TRAINABLE = ("all", "new")


def optimizer_labels(config: Config) -> dict:
    """ "muon" for each hidden matrix, "adam" for every other parameter, as the parameters declare it."""
    return jax.tree.map(
        lambda box: "muon" if box.hidden_matrix else "adam", param_annotations(config), is_leaf=is_annotated
    )


def new_parameters_mask(config: Config) -> dict:
    """True for each parameter declared new (`sleeplm.model.params.new_parameters`)."""
    return jax.tree.map(lambda box: box.new, param_annotations(config), is_leaf=is_annotated)


def make_optimizer(train: TrainConfig, config: Config) -> optax.GradientTransformation:
    def schedule(peak):
        return optax.warmup_cosine_decay_schedule(0.0, peak, train.warmup_steps, train.steps, end_value=0.0)

    transforms = {
        "muon": optax.contrib.muon(schedule(train.muon_lr), weight_decay=train.weight_decay),
        "adam": optax.adamw(schedule(train.adam_lr), weight_decay=train.weight_decay),
    }
    labels = optimizer_labels(config)
    clip = optax.clip_by_global_norm(train.clip_norm)
    if train.trainable == "all":
        return optax.chain(clip, optax.multi_transform(transforms, labels))
    new = new_parameters_mask(config)
    if not any(jax.tree.leaves(new)):
        raise ValueError(
            "train.trainable='new' is invalid for this model: it declares no new parameters (model.inserted_blocks "
            "is empty; insert blocks with --insert-gdn-at)"
        )
    frozen = jax.tree.map(lambda is_new: not is_new, new)
    labels = jax.tree.map(lambda label, is_new: label if is_new else "frozen", labels, new)
    zero_frozen = optax.masked(optax.set_to_zero(), frozen)  # before clipping: frozen gradients count for nothing
    return optax.chain(zero_frozen, clip, optax.multi_transform(transforms | {"frozen": optax.set_to_zero()}, labels))


# What a batch gives the model: always inputs, targets and loss_mask; packed rows also `valid` and `document_start`
# (see `sleeplm.sleep.forward`).
MODEL_KEYS = ("inputs", "targets", "loss_mask")
PACKING_KEYS = ("valid", "document_start")


def model_batch(batch: dict) -> dict:
    """The arrays of `batch` that the train and eval steps read (task metadata stays behind)."""
    return {key: batch[key] for key in MODEL_KEYS + PACKING_KEYS if key in batch}


def _logits(params, batch: dict, config: Config) -> jax.Array:
    return forward(params, batch["inputs"], config, **{key: batch[key] for key in PACKING_KEYS if key in batch})


def label_loss_sum(params, batch: dict, config: Config) -> tuple[jax.Array, jax.Array]:
    """Cross-entropy summed over the label positions (`loss_mask`), and the number of labels."""
    losses = optax.softmax_cross_entropy_with_integer_labels(_logits(params, batch, config), batch["targets"])
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
    Returns the new state and {loss, grad_norm}."""
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
    return TrainState(params, opt_state, state.step + 1), {"loss": loss, "grad_norm": optax.tree.norm(grads)}


@functools.partial(jax.jit, static_argnames=("config",))
def eval_step(params, batch: dict, config: Config) -> dict:
    """Per-example metrics: summed label loss, label count, labels right, whether every label is right, and per
    position the label's loss and whether it is right (`token_loss`, `right`: 0 / False off the labels)."""
    logits = _logits(params, batch, config)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
    mask = batch["loss_mask"]
    right = (jnp.argmax(logits, -1) == batch["targets"]) * mask
    return {
        "loss_sum": jnp.sum(losses * mask, axis=-1),
        "token_loss": losses * mask,
        "labels": jnp.sum(mask, axis=-1),
        "labels_right": jnp.sum(right, axis=-1),
        "exact": jnp.all((right == mask), axis=-1),
        "right": right > 0,
    }
