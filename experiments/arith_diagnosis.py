"""What do the one-operation arithmetic runs know? Their held-out accuracy per operator, against the best accuracy
possible from partial information about each problem (a Bayes-optimal answer, estimated by counting answers over
generated problems and scored on other ones).

    python experiments/arith_diagnosis.py RUN_WORKDIR [RUN_WORKDIR ...] [--examples 2048] [--out FILE]

A run workdir is `runs/experiments/arith-1op/NAME` (its latest checkpoint is read). Problems are read back from
their tokens, so the information sets do not depend on how the generator builds them.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from run import provenance  # experiments/run.py, beside this script

from sleeplm.data import batched, make_source
from sleeplm.data.arith import OPERATORS, ArithConfig
from sleeplm.experiment.files import CHECKPOINTS, EXPERIMENT
from sleeplm.experiment.schema import Experiment, experiment_from_json
from sleeplm.training.checkpoint import Checkpointer
from sleeplm.training.evaluate import eval_step

# What a partial solution may know of a one-operation problem `Q vX ; ... vX = vA op vC ; ... A :`.
from sleeplm.training.step import model_batch

INFORMATION = {
    "operator": lambda p: (p["operator"],),
    "operator and every constant's value, unordered": lambda p: (p["operator"], tuple(sorted(p["constants"]))),
    "operator and both operands' values, unordered": lambda p: (p["operator"], tuple(sorted(p["operands"]))),
    "operator and both operands' values": lambda p: (p["operator"], *p["operands"]),
}


def read_problem(words: list[str]) -> dict:
    """The queried statement's operator, its operands' values, every constant's value and the answer of a
    one-operation problem given as tokens (the answer last)."""
    target = words[words.index("Q") + 1]
    statements, current = [], []
    for word in words[words.index("Q") + 3 : words.index("A")]:
        current.append(word)
        if word == ";":
            statements.append(current[:-1])
            current = []
    constants = {s[0]: int(s[2]) for s in statements if len(s) == 3}
    (query,) = [s for s in statements if s[0] == target]
    if len(query) != 5 or query[2] not in constants or query[4] not in constants:
        raise ValueError(f"not a one-operation problem: {' '.join(words)}")
    return {
        "operator": query[3],
        "operands": (constants[query[2]], constants[query[4]]),
        "constants": list(constants.values()),
        "answer": int(words[-1]),
    }


def example_problem(config: ArithConfig, inputs: np.ndarray, targets: np.ndarray) -> dict:
    """The problem of one example (its inputs, then its last target: the answer)."""
    return read_problem(config.vocab.decode([*inputs.tolist(), int(targets[-1])]))


def problems(config: ArithConfig, split: str, count: int, seed: int = 0) -> list[dict]:
    """The one-operation problems among the first `count` examples of a split."""
    source = make_source(config, split, seed=seed, size=count)
    examples = (source[i] for i in range(count))
    return [example_problem(config, e["inputs"], e["targets"]) for e in examples if e["ops"] == 1]


def by_operator(right: np.ndarray, operators: list[str]) -> dict[str, float]:
    return {op: float(right[np.asarray(operators) == op].mean()) for op in OPERATORS}


def bayes_accuracy(fit: list[dict], score: list[dict], information) -> dict:
    """Accuracy on `score` of answering, for each problem, the most frequent answer among the `fit` problems that
    share its information (problems whose information `fit` never saw count as wrong)."""
    answers = collections.defaultdict(collections.Counter)
    for problem in fit:
        answers[information(problem)][problem["answer"]] += 1

    def best(problem: dict) -> int | None:
        seen = answers.get(information(problem))
        return seen.most_common(1)[0][0] if seen else None

    right = np.asarray([best(p) == p["answer"] for p in score])
    return {"accuracy": float(right.mean()), "by_operator": by_operator(right, [p["operator"] for p in score])}


def run_accuracy(workdir: Path, experiment: Experiment, examples: int) -> dict:
    """Exact accuracy per operator of the run's latest checkpoint on the one-operation problems among `examples`
    held-out ones of its own task."""
    params, step = Checkpointer(workdir / CHECKPOINTS, keep=1).restore_params(experiment)
    source = make_source(experiment.task, "eval", seed=experiment.train.seed, size=examples)
    right, operators = [], []
    for batch in batched(source, 128, seed=0, shuffle=False):
        result = eval_step(params, jax.tree.map(jnp.asarray, model_batch(batch)), experiment.config)
        one_op = batch["ops"] == 1
        right.extend(jax.device_get(result["exact"]).astype(bool)[one_op])
        for inputs, targets in zip(batch["inputs"][one_op], batch["targets"][one_op], strict=True):
            operators.append(example_problem(experiment.task, inputs, targets)["operator"])
    right = np.asarray(right)
    return {
        "step": step,
        "problems": len(right),
        "accuracy": float(right.mean()),
        "by_operator": by_operator(right, operators),
    }


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--examples", type=int, default=2048)
    parser.add_argument("--fit-examples", type=int, default=50_000)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    report = {"provenance": provenance(argv, "experiments/arith_diagnosis.py"), "runs": {}, "oracles": {}}
    one_op_tasks: dict[str, ArithConfig] = {}  # the oracles' task per label
    for workdir in args.runs:
        experiment = experiment_from_json(json.loads((workdir / EXPERIMENT).read_text()))
        report["runs"][workdir.name] = run_accuracy(workdir, experiment, args.examples)
        print(workdir.name, json.dumps(report["runs"][workdir.name]), flush=True)
        # One-operation problems are drawn alike whatever the mixture of operation counts: label them by size.
        task = dataclasses.replace(experiment.task, min_ops=1, max_ops=1)
        key = f"windows={task.windows}"
        if one_op_tasks.setdefault(key, task) != task:
            raise ValueError(f"{workdir}: its task differs from an earlier run's at {key} beyond the operation counts")
        if key not in report["oracles"]:
            fit, score = problems(task, "train", args.fit_examples), problems(task, "eval", args.examples)
            report["oracles"][key] = {name: bayes_accuracy(fit, score, info) for name, info in INFORMATION.items()}
            for name, result in report["oracles"][key].items():
                print(f"  {key}, knowing the {name}: {json.dumps(result)}", flush=True)
    if args.out:
        args.out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
