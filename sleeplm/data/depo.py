"""Depo: multi-hop retrieval over evicted context (docs/method.md).

A directed cycle of n nodes (n uniform in [min_nodes, max_nodes]) written as `src dst` edges in shuffled order,
each node name `name_length` tokens, left-padded to a whole number of windows; then `queries` queries
`<hop_k> start answer <eoq>` with k uniform in [min_hops, max_hops] (10 queries of 2-token names are 60 tokens).
Loss on the answer tokens. Held-out sets per hop count k fix every query's k and keep the training vocabulary.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from sleeplm.config import check_positive_ints
from sleeplm.data.common import TaskSource, Vocabulary
from sleeplm.data.task import Task

HELD_OUT_HOPS = (1, 2, 4, 8, 16)  # the hop counts with a held-out set of their own (those <= max_hops)


@dataclasses.dataclass(frozen=True)
class DepoConfig:
    max_nodes: int = 75
    min_nodes: int = 75
    name_length: int = 2
    name_tokens: int = 50
    min_hops: int = 1
    max_hops: int = 16
    queries: int = 10
    window: int = 75

    def __post_init__(self) -> None:
        names = ("max_nodes", "min_nodes", "name_length", "name_tokens", "min_hops", "max_hops", "queries", "window")
        check_positive_ints(self, names, prefix="task.")
        if not 2 <= self.min_nodes <= self.max_nodes:
            raise ValueError(f"task.min_nodes={self.min_nodes} is invalid: need 2 <= min_nodes <= max_nodes")
        if self.min_hops > self.max_hops:
            raise ValueError(f"task.min_hops={self.min_hops} is invalid: must be <= max_hops={self.max_hops}")
        if self.name_tokens**self.name_length < self.max_nodes:
            raise ValueError(
                f"task.name_tokens={self.name_tokens} is invalid: {self.name_tokens}^{self.name_length} names "
                f"cannot name {self.max_nodes} nodes"
            )

    @property
    def edge_block_length(self) -> int:
        """Tokens of the (padded) edge list: the longest edge list rounded up to whole windows."""
        longest = self.max_nodes * 2 * self.name_length
        return -(-longest // self.window) * self.window

    @property
    def sequence_length(self) -> int:
        return self.edge_block_length + self.queries * (2 + 2 * self.name_length) - 1

    @property
    def vocab(self) -> Vocabulary:
        hops = tuple(f"<hop_{k}>" for k in range(1, self.max_hops + 1))
        return Vocabulary(("<pad>", "<eoq>", *hops, *(f"n{i}" for i in range(self.name_tokens))))


class DepoSource(TaskSource):
    """Examples carry `hops` (per input position: k of the query whose answer token is the target, else 0).

    `hops=k` makes every query k hops (an evaluation subset); the config, hence the vocabulary, is unchanged.
    """

    config: DepoConfig

    def __init__(self, config: DepoConfig, *args, hops: int | None = None, **kwargs):
        super().__init__(config, *args, **kwargs)
        if hops is not None and (not isinstance(hops, int) or not 1 <= hops <= config.max_hops):
            raise ValueError(f"hops={hops!r} is invalid: must be an integer in [1, task.max_hops={config.max_hops}]")
        self.hops = hops

    def sample(self, rng: np.random.Generator):
        cfg = self.config
        nodes = int(rng.integers(cfg.min_nodes, cfg.max_nodes + 1))
        codes = rng.choice(cfg.name_tokens**cfg.name_length, size=nodes, replace=False)
        names = [
            [f"n{(code // cfg.name_tokens**j) % cfg.name_tokens}" for j in range(cfg.name_length)] for code in codes
        ]
        order = rng.permutation(nodes)  # the cycle visits order[0] -> order[1] -> ... -> order[0]
        successor = np.empty(nodes, int)
        successor[order] = np.roll(order, -1)
        edges = [names[src] + names[successor[src]] for src in rng.permutation(nodes)]
        edge_tokens = [token for edge in edges for token in edge]
        text = ["<pad>"] * (cfg.edge_block_length - len(edge_tokens)) + edge_tokens
        labels, hops = [], []
        for _ in range(cfg.queries):
            k = self.hops if self.hops is not None else int(rng.integers(cfg.min_hops, cfg.max_hops + 1))
            start = int(rng.integers(nodes))
            answer = start
            for _ in range(k):
                answer = successor[answer]
            text += [f"<hop_{k}>", *names[start]]
            labels += range(len(text), len(text) + cfg.name_length)
            hops += [k] * cfg.name_length
            text += [*names[answer], "<eoq>"]
        tokens = self.vocab.encode(text)
        hop_of_input = np.zeros(len(tokens) - 1, np.int32)
        hop_of_input[np.asarray(labels) - 1] = hops
        return tokens, np.asarray(labels), {"hops": hop_of_input}, tokens.tobytes()


def held_out_sets_by_hops(config: DepoConfig) -> dict[str, dict]:
    """One held-out set per hop count k in HELD_OUT_HOPS up to max_hops, named "k{k}"."""
    return {f"k{k}": {"hops": k} for k in HELD_OUT_HOPS if k <= config.max_hops}


DEPO = Task("depo", DepoConfig, DepoSource, held_out_sets=held_out_sets_by_hops)
