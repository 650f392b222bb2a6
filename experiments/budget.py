"""What would a preset's training cost on the machine a committed run ran on? Scales the run's measured wall time by
the ratio of training FLOPs between the preset and the run, both counted by `sleeplm.training.flops` (useful work: sleep
passes, attention over the window, the head; training = 3x forward) on one training batch, times the steps.

    python experiments/budget.py RUN_RESULT_DIR PRESET [--out FILE]

RUN_RESULT_DIR is a committed run, `experiments/results/SWEEP/RUN` (its experiment.json and time.json are read).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from run import provenance  # experiments/run.py, beside this script

from sleeplm.data import batched, make_source
from sleeplm.experiment.files import EXPERIMENT
from sleeplm.experiment.schema import Experiment, experiment_from_json
from sleeplm.training.flops import train_flops
from sleeplm.training.presets import PRESETS, build_experiment


def training_compute(experiment: Experiment) -> dict:
    """Training tokens (steps x batch x example length) and FLOPs (steps x those of the first training batch)."""
    batch_size = experiment.train.batch_size
    source = make_source(experiment.task, "train", seed=experiment.train.seed, size=batch_size)
    batch = batched(source, batch_size, seed=experiment.train.seed, shuffle=False)[0]
    steps, length = experiment.train.steps, batch["inputs"].shape[1]
    return {
        "example_length": length,
        "tokens": steps * batch_size * length,
        "flops": steps * train_flops(experiment.config, batch),
    }


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("preset", choices=sorted(PRESETS))
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    for name in (EXPERIMENT, "time.json"):
        if not (args.run / name).is_file():
            parser.error(f"run {args.run}: no {name} (expected a committed run, experiments/results/SWEEP/RUN)")
    time = json.loads((args.run / "time.json").read_text())
    if "timed_from_step" in time:
        parser.error(f"run {args.run}: only timed from step {time['timed_from_step']}; pick a run timed throughout")
    measured = training_compute(experiment_from_json(json.loads((args.run / EXPERIMENT).read_text())))
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
