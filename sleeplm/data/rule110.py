"""Rule 110 (SPEC §4): reasoning depth = rollout steps.

`num_strings` random binary strings of `width` cells (periodic boundary), one per window of L tokens (left-padded
when width < L), then a query token and one label per string: the leftmost cell after `steps` Rule 110 updates.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from sleeplm.data.common import TaskSource, Vocabulary

VOCAB = Vocabulary(("0", "1", "<pad>", "<query>"))


@dataclasses.dataclass(frozen=True)
class Rule110Config:
    width: int = 24
    num_strings: int = 4
    steps: int = 8
    window: int = 24

    def __post_init__(self) -> None:
        for name, low in (("width", 3), ("num_strings", 1), ("steps", 0), ("window", 1)):
            value = getattr(self, name)
            if not isinstance(value, int) or value < low:
                raise ValueError(f"task.{name}={value!r} is invalid: must be an integer >= {low}")
        if self.width > self.window:
            raise ValueError(f"task.width={self.width} is invalid: a string must fit in one window ({self.window})")

    @property
    def sequence_length(self) -> int:
        """Length of `inputs` (the token sequence less its last token)."""
        return self.num_strings * self.window + self.num_strings


def rule110_step(cells: np.ndarray) -> np.ndarray:
    """One synchronous Rule 110 update of each row of `cells` (..., width), periodic boundary."""
    neighbourhood = 4 * np.roll(cells, 1, axis=-1) + 2 * cells + np.roll(cells, -1, axis=-1)
    return (110 >> neighbourhood) & 1


class Rule110Source(TaskSource):
    vocab = VOCAB

    def __init__(self, config: Rule110Config, split: str = "train", seed: int = 0, size: int = 1 << 30, **kwargs):
        super().__init__(split, seed, size, **kwargs)
        self.config = config

    def sample(self, rng: np.random.Generator):
        cfg = self.config
        cells = rng.integers(0, 2, size=(cfg.num_strings, cfg.width))
        final = cells
        for _ in range(cfg.steps):
            final = rule110_step(final)
        pad = np.full((cfg.num_strings, cfg.window - cfg.width), VOCAB.encode(["<pad>"])[0])
        strings = np.concatenate([pad, cells], axis=1).reshape(-1)  # '0'/'1' have ids 0/1
        tokens = np.concatenate([strings, VOCAB.encode(["<query>"]), final[:, 0]]).astype(np.int32)
        labels = np.arange(len(tokens) - cfg.num_strings, len(tokens))
        return tokens, labels, {}, np.packbits(cells).tobytes()
