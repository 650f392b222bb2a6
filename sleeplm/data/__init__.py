"""Task generators (SPEC §4) as grain random-access data sources, deterministic from a seed.

Each example is a dict of numpy arrays: `inputs`, `targets` (next tokens), `loss_mask`, plus task metadata.
This package is the only one that imports grain (the lent GPU machines do not have it).
"""

from __future__ import annotations

import grain

from sleeplm.data.arith import ArithConfig, ArithSource
from sleeplm.data.common import TaskSource, Vocabulary
from sleeplm.data.depo import DepoConfig, DepoSource
from sleeplm.data.rule110 import Rule110Config, Rule110Source

TASKS = {
    "rule110": (Rule110Config, Rule110Source),
    "depo": (DepoConfig, DepoSource),
    "arith": (ArithConfig, ArithSource),
}


def make_source(task_config, split: str = "train", seed: int = 0, size: int = 1 << 30, **kwargs) -> TaskSource:
    """The data source of a task config (`Rule110Config`, `DepoConfig` or `ArithConfig`)."""
    for config_type, source_type in TASKS.values():
        if isinstance(task_config, config_type):
            return source_type(task_config, split=split, seed=seed, size=size, **kwargs)
    raise ValueError(
        f"task config {type(task_config).__name__} is not one of {[c.__name__ for c, _ in TASKS.values()]}"
    )


def batched(source: TaskSource, batch_size: int, seed: int, shuffle: bool = True) -> grain.MapDataset:
    """A grain MapDataset of batches (dicts of stacked arrays), deterministic from `seed`."""
    dataset = grain.MapDataset.source(source)
    if shuffle:
        dataset = dataset.shuffle(seed=seed)
    return dataset.batch(batch_size, drop_remainder=True)


__all__ = [
    "TASKS",
    "ArithConfig",
    "ArithSource",
    "DepoConfig",
    "DepoSource",
    "Rule110Config",
    "Rule110Source",
    "TaskSource",
    "Vocabulary",
    "batched",
    "make_source",
]
