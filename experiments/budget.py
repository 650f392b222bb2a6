"""What would a preset's training cost on the machine a committed run ran on? Scales the run's measured wall time by
the ratio of training compute between the preset and the run, counted as 6 x (parameters outside the embedding and
the output head) x (training tokens): the matmul work of a forward and backward pass, leaving out attention scores,
the fast-weight recurrence and sleep passes (each pass past the first adds about one N=1 training step).

    python experiments/budget.py RUN_RESULT_DIR PRESET [--out FILE]

RUN_RESULT_DIR is a committed run, `experiments/results/SWEEP/RUN` (its experiment.json and time.json are read).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import jax
from run import provenance  # experiments/run.py, beside this script

from sleeplm.data import make_source
from sleeplm.presets import PRESETS, Experiment, build_experiment, experiment_from_json
from sleeplm.sleep import init_params

TOKEN_TABLES = ("embedding", "head")  # the embedding (a lookup) and the output head, left out as in the usual 6ND count


def training_compute(experiment: Experiment) -> dict:
    """Parameters in the blocks, training tokens (steps x batch x example length) and 6 x their product."""
    shapes = jax.eval_shape(lambda: init_params(jax.random.key(0), experiment.config))["params"]
    blocks = {name: tree for name, tree in shapes.items() if name not in TOKEN_TABLES}
    parameters = sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(blocks))
    length = len(make_source(experiment.task, "train", seed=0, size=1)[0]["inputs"])
    tokens = experiment.train.steps * experiment.train.batch_size * length
    return {"parameters": parameters, "example_length": length, "tokens": tokens, "flops": 6 * parameters * tokens}


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("preset", choices=sorted(PRESETS))
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    for name in ("experiment.json", "time.json"):
        if not (args.run / name).is_file():
            parser.error(f"run {args.run}: no {name} (expected a committed run, experiments/results/SWEEP/RUN)")
    time = json.loads((args.run / "time.json").read_text())
    if "timed_from_step" in time:
        parser.error(f"run {args.run}: only timed from step {time['timed_from_step']}; pick a run timed throughout")
    measured = training_compute(experiment_from_json(json.loads((args.run / "experiment.json").read_text())))
    wanted = training_compute(build_experiment(args.preset))
    ratio = wanted["flops"] / measured["flops"]
    report = {
        "provenance": provenance(argv, "experiments/budget.py"),
        "run": {"path": str(args.run), **measured, "hours": time["seconds"] / 3600},
        "preset": {"name": args.preset, **wanted},
        "compute_ratio": ratio,
        "estimated_hours": ratio * time["seconds"] / 3600,
    }
    print(json.dumps(report, indent=1))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
