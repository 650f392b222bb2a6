"""Muon for the hidden weight matrices, AdamW for every other parameter (docs/method.md, "Training"), chosen by the
roles the parameters declare; `train.trainable="new"` freezes every parameter not declared new."""

from __future__ import annotations

import jax
import optax

from sleeplm.config import Config
from sleeplm.core.parameters import param_annotations
from sleeplm.experiment.schema import TrainConfig
from sleeplm.model.params import is_annotated


def optimizer_labels(config: Config) -> dict:
    """ "muon" for each hidden matrix, "adam" for every other parameter, as the parameters declare it."""
    return jax.tree.map(
        lambda box: "muon" if box.hidden_matrix else "adam", param_annotations(config), is_leaf=is_annotated
    )


def new_parameters_mask(config: Config) -> dict:
    """True for each parameter declared new (`sleeplm.model.params.new_parameters`)."""
    return jax.tree.map(lambda box: box.new, param_annotations(config), is_leaf=is_annotated)


def learning_rates(train: TrainConfig) -> dict[str, optax.Schedule]:
    """The learning-rate schedules by name ("muon_lr", "adam_lr"): step -> rate, warmup then cosine decay to 0.
    The optimizer's count before step k's update is k - 1, so step k trains at `schedule(k - 1)`."""

    def schedule(peak):
        return optax.warmup_cosine_decay_schedule(0.0, peak, train.warmup_steps, train.steps, end_value=0.0)

    return {"muon_lr": schedule(train.muon_lr), "adam_lr": schedule(train.adam_lr)}


def make_optimizer(train: TrainConfig, config: Config) -> optax.GradientTransformation:
    rates = learning_rates(train)
    transforms = {
        "muon": optax.contrib.muon(rates["muon_lr"], weight_decay=train.weight_decay),
        "adam": optax.adamw(rates["adam_lr"], weight_decay=train.weight_decay),
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
