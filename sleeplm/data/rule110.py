"""Rule 110: reasoning depth = rollout steps (docs/method.md).

`num_strings` random binary strings of `width` cells (periodic boundary), one per window of L tokens (left-padded
when width < L), then a query token and one label per string: the leftmost cell after `steps` Rule 110 updates.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from sleeplm.config import check_ints_at_least
from sleeplm.data.common import TaskSource, Vocabulary
from sleeplm.data.task import Task

VOCAB = Vocabulary(("0", "1", "<pad>", "<query>"))  # '0' and '1' have ids 0 and 1: a cell's value is its id


@dataclasses.dataclass(frozen=True)
class Rule110Config:
    width: int = 24
    num_strings: int = 4
    steps: int = 8
    window: int = 24

    def __post_init__(self) -> None:
        check_ints_at_least(self, {"width": 3, "num_strings": 1, "steps": 0, "window": 1}, prefix="task.")
        if self.width > self.window:
            raise ValueError(f"task.width={self.width} is invalid: a string must fit in one window ({self.window})")

    @property
    def sequence_length(self) -> int:
        """Length of `inputs` (the token sequence less its last token)."""
        return self.num_strings * self.window + self.num_strings

    @property
    def vocab(self) -> Vocabulary:
        return VOCAB


def rule110_step(cells: np.ndarray) -> np.ndarray:
    """One synchronous Rule 110 update of each row of `cells` (..., width), periodic boundary."""
    neighbourhood = 4 * np.roll(cells, 1, axis=-1) + 2 * cells + np.roll(cells, -1, axis=-1)
    return (110 >> neighbourhood) & 1


class Rule110Source(TaskSource):
    config: Rule110Config

    def sample(self, rng: np.random.Generator):
        cfg = self.config
        cells = rng.integers(0, 2, size=(cfg.num_strings, cfg.width))
        final = cells
        for _ in range(cfg.steps):
            final = rule110_step(final)
        pad = np.full((cfg.num_strings, cfg.window - cfg.width), self.vocab.encode(["<pad>"])[0])
        strings = np.concatenate([pad, cells], axis=1).reshape(-1)
        tokens = np.concatenate([strings, self.vocab.encode(["<query>"]), final[:, 0]]).astype(np.int32)
        labels = np.arange(len(tokens) - cfg.num_strings, len(tokens))
        return tokens, labels, {}, np.packbits(cells).tobytes()


def rule110_metrics(results: dict[str, np.ndarray], examples: dict[str, np.ndarray]) -> dict[str, float]:
    """Accuracy of each label position (label i answers string i): every example has its labels in order."""
    per_label = results["right"][examples["loss_mask"] > 0].reshape(len(results["exact"]), -1)
    return {f"label{i}_accuracy": float(accuracy) for i, accuracy in enumerate(per_label.mean(0))}


RULE110 = Task("rule110", Rule110Config, Rule110Source, metrics=rule110_metrics)
