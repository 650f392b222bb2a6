"""Recall: multi-query associative recall (after Zoology's MQAR) from windows evicted before the queries.

`windows` context windows of L tokens, then one query per chain. Each context window whose distance to the first
query window (in windows; a query in a later window is that much further) is in [min_distance, max_distance] holds
`pairs_per_window` facts `<fact> key value` at random places in filler; the others are filler alone. A queried
chain is `hops` facts in distinct windows, `k0 -> k1 -> ... -> value` (keys point to keys, the last to a value
token). `overwrites` of the chains' facts are also assigned earlier in the stream, to a stale value token other than
the answer (the latest assignment counts). Distractor facts with fresh keys fill the remaining slots. Queries
`<ask> k0 value` come last in shuffled order, from a window boundary; loss on the value. Hashed content: the whole
token sequence.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import numpy as np

from sleeplm.config import check_ints_at_least, check_positive_ints
from sleeplm.data.common import TaskSource, Vocabulary
from sleeplm.data.task import Task

FACT, QUERY = 3, 3  # tokens of `<fact> key value` and of `<ask> key value`
MAX_PLACEMENTS = 1000  # draws of a layout before a config is declared unplaceable


class Fact(NamedTuple):
    key: str
    value: str
    link: tuple[int, int] | None  # (chain, hop) of a queried chain's fact, None for a distractor
    stale: bool  # an earlier assignment that a later one overrides


@dataclasses.dataclass(frozen=True)
class RecallConfig:
    windows: int = 3
    pairs_per_window: int = 2
    min_distance: int = 1
    max_distance: int = 3
    queries: int = 4
    hops: int = 1
    overwrites: int = 0
    key_tokens: int = 16
    value_tokens: int = 16
    filler_tokens: int = 8
    window: int = 16

    def __post_init__(self) -> None:
        names = ("windows", "pairs_per_window", "min_distance", "max_distance", "queries", "hops", "key_tokens")
        check_positive_ints(self, (*names, "value_tokens", "filler_tokens", "window"), prefix="task.")
        check_ints_at_least(self, {"overwrites": 0, "value_tokens": 2}, prefix="task.")
        if self.min_distance > self.max_distance:
            raise ValueError(
                f"task.min_distance={self.min_distance} is invalid: must be <= max_distance={self.max_distance}"
            )
        if self.max_distance > self.windows:
            raise ValueError(
                f"task.max_distance={self.max_distance} is invalid: must be <= windows={self.windows} (facts sit in "
                "context windows)"
            )
        if FACT * self.pairs_per_window > self.window:
            raise ValueError(
                f"task.pairs_per_window={self.pairs_per_window} is invalid: {self.pairs_per_window} facts of {FACT} "
                f"tokens do not fit in a window of {self.window}"
            )
        if self.hops > self.fact_windows:
            raise ValueError(
                f"task.hops={self.hops} is invalid: a chain's facts sit in distinct windows, and only "
                f"{self.fact_windows} windows hold facts (max_distance - min_distance + 1)"
            )
        if self.overwrites > self.queries * self.hops:
            raise ValueError(
                f"task.overwrites={self.overwrites} is invalid: must be <= queries x hops = {self.queries * self.hops} "
                "(each overwrite re-assigns a distinct fact of a queried chain)"
            )
        if self.queries * self.hops + self.overwrites > self.slots:
            raise ValueError(
                f"task.queries={self.queries} is invalid: queries x hops + overwrites = "
                f"{self.queries * self.hops + self.overwrites} facts exceed the {self.slots} slots "
                f"(pairs_per_window x {self.fact_windows} fact windows)"
            )
        if self.key_tokens < self.slots - self.overwrites:
            raise ValueError(
                f"task.key_tokens={self.key_tokens} is invalid: an example needs {self.slots - self.overwrites} "
                "distinct keys"
            )

    @property
    def fact_windows(self) -> int:
        return self.max_distance - self.min_distance + 1

    @property
    def slots(self) -> int:
        """Facts per example: pairs_per_window in each window that holds facts."""
        return self.fact_windows * self.pairs_per_window

    @property
    def sequence_length(self) -> int:
        return self.windows * self.window + self.queries * QUERY - 1

    @property
    def vocab(self) -> Vocabulary:
        keys = tuple(f"k{i}" for i in range(self.key_tokens))
        values = tuple(f"v{i}" for i in range(self.value_tokens))
        filler = tuple(f"f{i}" for i in range(self.filler_tokens))
        return Vocabulary(("<fact>", "<ask>", *keys, *values, *filler))


class RecallSource(TaskSource):
    """Examples carry, per query in stream order: `fact_position` (queries, hops), the token index of each live fact
    of its chain (its `<fact>`), in chain order; `fact_distance` (queries, hops), the windows between each of those
    facts and the query's answer input; `distance` (queries,), the largest of them; `overwritten` (queries,), 1 when a
    fact of the chain was assigned a stale value earlier."""

    config: RecallConfig

    def _place(self, rng: np.random.Generator):
        """Each chain's fact windows (greedy on free slots, random ties: always fits) and, per overwritten
        (chain, hop), a window at or before the live fact's for the stale one (earliest deadline first); None when a
        stale fact finds no room."""
        cfg = self.config
        free = np.full(cfg.fact_windows, cfg.pairs_per_window)
        chains = np.empty((cfg.queries, cfg.hops), int)
        for q in range(cfg.queries):
            order = np.lexsort((rng.random(cfg.fact_windows), -free))[: cfg.hops]
            chains[q] = rng.permutation(order)
            free[order] -= 1
        overwritten = rng.choice(cfg.queries * cfg.hops, size=cfg.overwrites, replace=False)
        stale = {}
        for link in sorted(overwritten, key=lambda link: chains.flat[link]):
            room = np.flatnonzero(free[: chains.flat[link] + 1])
            if not len(room):
                return None
            stale[divmod(int(link), cfg.hops)] = window = int(rng.choice(room))
            free[window] -= 1
        return chains, stale, free

    def _facts(self, rng: np.random.Generator, chains, stale, free):
        """Per fact window, its facts in stream order; the chains' first keys and their answers."""
        cfg = self.config
        keys = [f"k{i}" for i in rng.choice(cfg.key_tokens, size=cfg.slots - cfg.overwrites, replace=False)]
        answers = [f"v{i}" for i in rng.integers(cfg.value_tokens, size=cfg.queries)]
        facts = [[] for _ in range(cfg.fact_windows)]
        for q in range(cfg.queries):
            chain = [*keys[q * cfg.hops : (q + 1) * cfg.hops], answers[q]]
            for h in range(cfg.hops):
                facts[chains[q, h]].append(Fact(chain[h], chain[h + 1], (q, h), False))
                if (q, h) in stale:
                    values = [f"v{i}" for i in range(cfg.value_tokens) if f"v{i}" != answers[q]]  # never right
                    facts[stale[q, h]].append(Fact(chain[h], values[int(rng.integers(len(values)))], (q, h), True))
        distractors = iter(keys[cfg.queries * cfg.hops :])
        for w in range(cfg.fact_windows):
            facts[w] += [
                Fact(next(distractors), f"v{rng.integers(cfg.value_tokens)}", None, False) for _ in range(free[w])
            ]
            facts[w] = [facts[w][i] for i in rng.permutation(cfg.pairs_per_window)]
            late = [
                (i, j)
                for i, a in enumerate(facts[w])
                for j, b in enumerate(facts[w])
                if a.stale and b.link == a.link and not b.stale and j < i
            ]
            for i, j in late:  # a stale fact goes before its live one
                facts[w][i], facts[w][j] = facts[w][j], facts[w][i]
        return facts, keys[:: cfg.hops][: cfg.queries], answers

    def sample(self, rng: np.random.Generator):
        cfg = self.config
        for _ in range(MAX_PLACEMENTS):
            placed = self._place(rng)
            if placed is not None:
                break
        else:
            raise RuntimeError(
                f"task.overwrites={cfg.overwrites}: found no layout in {MAX_PLACEMENTS} draws that puts every stale "
                "fact before its live one; lower overwrites or raise pairs_per_window"
            )
        chains, stale, free = placed
        facts, first_keys, answers = self._facts(rng, chains, stale, free)
        text, live = [], {}
        first_fact_window = cfg.windows - cfg.max_distance
        fillers = cfg.window - FACT * cfg.pairs_per_window
        for w in range(cfg.windows):
            if not first_fact_window <= w < first_fact_window + cfg.fact_windows:
                text += [f"f{i}" for i in rng.integers(cfg.filler_tokens, size=cfg.window)]
                continue
            is_fact = np.zeros(fillers + cfg.pairs_per_window, bool)
            is_fact[rng.choice(len(is_fact), size=cfg.pairs_per_window, replace=False)] = True
            pending = iter(facts[w - first_fact_window])
            for unit in is_fact:
                if not unit:
                    text.append(f"f{rng.integers(cfg.filler_tokens)}")
                    continue
                fact = next(pending)
                if fact.link is not None and not fact.stale:
                    live[fact.link] = len(text)
                text += ["<fact>", fact.key, fact.value]
        order = rng.permutation(cfg.queries)
        labels = len(text) + QUERY * np.arange(cfg.queries) + 2
        for q in order:
            text += ["<ask>", first_keys[q], answers[q]]
        fact_position = np.asarray([[live[q, h] for h in range(cfg.hops)] for q in order], np.int32)
        fact_distance = ((labels[:, None] - 1) // cfg.window - fact_position // cfg.window).astype(np.int32)
        stale_chains = {q for q, _ in stale}
        tokens = self.vocab.encode(text)
        metadata = {
            "fact_position": fact_position,
            "fact_distance": fact_distance,
            "distance": fact_distance.max(axis=1),
            "overwritten": np.asarray([q in stale_chains for q in order], np.int32),
        }
        return tokens, labels, metadata, tokens.tobytes()


def recall_metrics(results: dict[str, np.ndarray], examples: dict[str, np.ndarray]) -> dict[str, float]:
    """Answer accuracy by distance (windows between the query and its chain's oldest live fact), and on queries
    whose chain had a fact overwritten."""
    right = results["right"][examples["loss_mask"] > 0].reshape(examples["distance"].shape)
    metrics = {
        f"accuracy@dist{d}": float(right[examples["distance"] == d].mean()) for d in np.unique(examples["distance"])
    }
    if examples["overwritten"].any():
        metrics["accuracy@overwritten"] = float(right[examples["overwritten"] > 0].mean())
    return metrics


RECALL = Task("recall", RecallConfig, RecallSource, metrics=recall_metrics)
