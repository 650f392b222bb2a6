"""Multi-step modular arithmetic with distractors (docs/method.md; in the spirit of GSM-Infinite's symbolic problems).

Layout: left padding, the question `Q vX ;`, declarative statements in shuffled order (constants `vA = 7 ;` and
operations `vB = vA + vC ;`, mod P), then `A :` and the answer (one token). The queried variable's dependency
closure holds exactly `ops` operations (0: the queried variable is a constant, a single lookup); distractor
statements (which may read chain variables, so names alone do not tell them apart) fill the problem to `windows`
windows. The answer is drawn uniformly from Z_P first and the problem rejection-sampled to match it, so always
answering the most frequent value scores about 1/P.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from sleeplm.config import check_ints_at_least, check_positive_ints
from sleeplm.data.common import TaskSource, Vocabulary
from sleeplm.data.task import Task

OPERATORS = {"+": lambda a, b, p: (a + b) % p, "-": lambda a, b, p: (a - b) % p, "*": lambda a, b, p: (a * b) % p}
CONST_TOKENS, OP_TOKENS = 4, 6  # `v = 7 ;` and `v = a + b ;`


@dataclasses.dataclass(frozen=True)
class ArithConfig:
    num_vars: int = 64
    modulus: int = 10
    min_ops: int = 1
    max_ops: int = 8
    windows: int = 4
    window: int = 32
    reuse_probability: float = 0.5

    def __post_init__(self) -> None:
        check_positive_ints(self, ("num_vars", "modulus", "max_ops", "windows", "window"), prefix="task.")
        check_ints_at_least(self, {"min_ops": 0}, prefix="task.")  # 0: the queried variable is a constant
        probability = self.reuse_probability
        if isinstance(probability, bool) or not isinstance(probability, int | float) or not 0 <= probability <= 1:
            raise ValueError(f"task.reuse_probability={self.reuse_probability!r} is invalid: must be in [0, 1]")
        if self.min_ops > self.max_ops:
            raise ValueError(f"task.min_ops={self.min_ops} is invalid: must be <= max_ops={self.max_ops}")
        if self.modulus < 2:
            raise ValueError(f"task.modulus={self.modulus} is invalid: must be >= 2")
        longest_chain = (self.max_ops + 1) * CONST_TOKENS + self.max_ops * OP_TOKENS + 6  # + question and answer
        if longest_chain > self.windows * self.window + 1:
            raise ValueError(
                f"task.windows={self.windows} x window={self.window} is too short for max_ops={self.max_ops} "
                f"(a chain needs up to {longest_chain} tokens)"
            )
        if 2 * self.max_ops + 1 > self.num_vars:
            raise ValueError(f"task.num_vars={self.num_vars} is too few for max_ops={self.max_ops}")

    @property
    def sequence_length(self) -> int:
        return self.windows * self.window

    @property
    def vocab(self) -> Vocabulary:
        names = tuple(f"v{i}" for i in range(self.num_vars))
        values = tuple(str(i) for i in range(self.modulus))
        return Vocabulary(("<pad>", *names, *values, "=", ";", *OPERATORS, "Q", "A", ":"))


class ArithSource(TaskSource):
    """Examples carry `ops` (the chain's operation count) and `answer` (the answer's value)."""

    config: ArithConfig

    def _chain(self, rng, ops, names, values):
        """`ops` operations, each reading the previous result, so all of them are in the closure of the last."""
        cfg = self.config
        statements = []

        def constant():
            name = names.pop()
            values[name] = int(rng.integers(cfg.modulus))
            statements.append([name, "=", str(values[name]), ";"])
            return name

        previous, earlier = constant(), []
        for _ in range(ops):
            operand = earlier[int(rng.integers(len(earlier)))] if earlier and rng.random() < 0.5 else constant()
            operator = str(rng.choice(list(OPERATORS)))
            result = names.pop()
            values[result] = OPERATORS[operator](values[previous], values[operand], cfg.modulus)
            statements.append([result, "=", previous, operator, operand, ";"])
            earlier.append(previous)
            previous = result
        return previous, statements

    def sample(self, rng: np.random.Generator):
        cfg = self.config
        ops = int(rng.integers(cfg.min_ops, cfg.max_ops + 1))
        answer = int(rng.integers(cfg.modulus))
        while True:  # rejection: the chain's value must be the answer drawn uniformly above
            names = [f"v{i}" for i in rng.permutation(cfg.num_vars)]
            values: dict[str, int] = {}
            target, statements = self._chain(rng, ops, names, values)
            if values[target] == answer:
                break
        chain_vars = list(values)
        budget = cfg.sequence_length + 1 - 3 - 3 - sum(map(len, statements))  # less `Q vX ;` and `A : a`
        while names and budget >= CONST_TOKENS:
            name = names.pop()
            defined = list(values)
            if budget >= OP_TOKENS and len(defined) >= 2 and rng.random() < 0.7:
                pool = chain_vars if rng.random() < cfg.reuse_probability else defined
                a, b = str(rng.choice(pool)), str(rng.choice(defined))
                operator = str(rng.choice(list(OPERATORS)))
                values[name] = OPERATORS[operator](values[a], values[b], cfg.modulus)
                statements.append([name, "=", a, operator, b, ";"])
            else:
                values[name] = int(rng.integers(cfg.modulus))
                statements.append([name, "=", str(values[name]), ";"])
            budget -= len(statements[-1])
        order = rng.permutation(len(statements))
        body = [token for i in order for token in statements[i]]
        text = ["<pad>"] * budget + ["Q", target, ";", *body, "A", ":", str(answer)]
        tokens = self.vocab.encode(text)
        return (
            tokens,
            np.asarray([len(tokens) - 1]),
            {"ops": np.int32(ops), "answer": np.int32(answer)},
            tokens.tobytes(),
        )


def arith_metrics(results: dict[str, np.ndarray], examples: dict[str, np.ndarray]) -> dict[str, float]:
    """Exact accuracy per operation count, and the accuracy of always answering the most frequent answer."""
    metrics = {
        f"accuracy@ops{count}": float(results["exact"][examples["ops"] == count].mean())
        for count in np.unique(examples["ops"])
    }
    metrics["majority_answer_accuracy"] = float(np.bincount(examples["answer"]).max() / len(examples["answer"]))
    return metrics


ARITH = Task("arith", ArithConfig, ArithSource, metrics=arith_metrics)
