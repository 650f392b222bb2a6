"""What every task generator shares: a vocabulary, deterministic per-index sampling, a held-out split by content
hash (train and eval can never share an example), and the next-token layout of an example."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
from collections.abc import Callable, Sequence

import numpy as np

SPLITS = ("train", "eval")
MAX_ATTEMPTS = 10_000


@dataclasses.dataclass(frozen=True)
class Vocabulary:
    """Token strings <-> ids."""

    tokens: tuple[str, ...]

    def __post_init__(self) -> None:
        if len(set(self.tokens)) != len(self.tokens):
            raise ValueError("vocabulary tokens must be distinct")

    def __len__(self) -> int:
        return len(self.tokens)

    def encode(self, tokens: Sequence[str]) -> np.ndarray:
        index = self._index
        missing = [t for t in tokens if t not in index]
        if missing:
            raise ValueError(f"tokens {missing[:5]} are not in the vocabulary of {len(self)} tokens")
        return np.asarray([index[t] for t in tokens], np.int32)

    def decode(self, ids: Sequence[int]) -> list[str]:
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < len(self)]
        if bad:
            raise ValueError(f"token ids {bad[:5]} are outside the vocabulary range [0, {len(self)})")
        return [self.tokens[i] for i in ids]

    @property
    def _index(self) -> dict[str, int]:
        return {token: i for i, token in enumerate(self.tokens)}


def content_digest(content: bytes) -> int:
    """The 64-bit content hash (blake2b) that decides an example's split."""
    return int.from_bytes(hashlib.blake2b(content, digest_size=8).digest(), "little")


def digest_is_held_out(digest: int, fraction: float) -> bool:
    """Whether content of this `content_digest` belongs to the held-out (eval) set: its hash, read as a number in
    [0, 1), falls below `fraction`."""
    return digest / 2**64 < fraction


def is_held_out(content: bytes, fraction: float) -> bool:
    """Deterministic membership of an example's content in the held-out (eval) set."""
    return digest_is_held_out(content_digest(content), fraction)


def next_token_example(tokens: np.ndarray, label_positions: np.ndarray, **metadata: np.ndarray) -> dict:
    """inputs = tokens[:-1], targets = tokens[1:]; loss_mask marks the inputs whose target is a label token."""
    mask = np.zeros(len(tokens) - 1, np.float32)
    mask[np.asarray(label_positions) - 1] = 1.0
    return {
        "inputs": tokens[:-1].astype(np.int32),
        "targets": tokens[1:].astype(np.int32),
        "loss_mask": mask,
        **metadata,
    }


class TaskSource:
    """A grain random-access data source: example `index` of a split is a pure function of (seed, split, index).

    `sample(rng)` draws one candidate as (token ids, label positions, metadata, content bytes); candidates whose
    content hashes into the held-out fraction go to "eval" only, the rest to "train" only. Every source of a config
    encodes with the config's vocabulary, so its examples read the same in training and in every held-out set.
    A source whose examples are read rather than sampled (the text task's) overrides `__getitem__` and `__len__`.
    """

    def __init__(
        self, config, split: str = "train", seed: int = 0, size: int = 1 << 30, held_out_fraction: float = 0.1
    ) -> None:
        self.config = config
        if split not in SPLITS:
            raise ValueError(f"split={split!r} is invalid: allowed splits are {SPLITS}")
        if not 0.0 < held_out_fraction < 1.0:
            raise ValueError(f"held_out_fraction={held_out_fraction!r} is invalid: must be in (0, 1)")
        if size < 1:
            raise ValueError(f"size={size!r} is invalid: must be a positive number of examples")
        self.split, self.seed, self.size, self.held_out_fraction = split, seed, size, held_out_fraction

    sample: Callable[[np.random.Generator], tuple[np.ndarray, np.ndarray, dict, bytes]]

    @functools.cached_property
    def vocab(self) -> Vocabulary:
        """The config's vocabulary (a config with a `vocab_size` instead, like the text task's, has none)."""
        return self.config.vocab

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.size:
            raise IndexError(f"index {index} is outside [0, {self.size})")
        want_held_out = self.split == "eval"
        rng = np.random.default_rng([self.seed, SPLITS.index(self.split), int(index)])
        for _ in range(MAX_ATTEMPTS):
            tokens, labels, metadata, content = self.sample(rng)
            if is_held_out(content, self.held_out_fraction) == want_held_out:
                return next_token_example(tokens, labels, **metadata)
        raise RuntimeError(
            f"no {self.split} example found in {MAX_ATTEMPTS} draws: the task's example space is too small for "
            f"held_out_fraction={self.held_out_fraction}"
        )
