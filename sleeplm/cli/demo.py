"""`sleeplm demo` (the README's `make demo`): train the CPU-scale Rule 110 preset at N = 1 and N = 2 passes on the
same data in the same order, with the same schedule and steps (the paper's equal-token comparison), evaluate both
on the same held-out set, print a table and write a plot."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from sleeplm.cli.plot import plot_runs, read_evals
from sleeplm.training.presets import build_experiment
from sleeplm.training.run import run_training

DEMO_OVERRIDES = {"train.steps": "400", "run.eval_every": "50", "run.checkpoint_every": "400"}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="sleeplm demo", description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("runs/demo"))
    parser.add_argument("--passes", default="1,2", help="comma-separated N values to compare")
    parser.add_argument("--steps", type=int, default=int(DEMO_OVERRIDES["train.steps"]))
    args = parser.parse_args(argv)
    passes = [int(n) for n in args.passes.split(",")]
    overrides = DEMO_OVERRIDES | {"train.steps": str(args.steps)}

    runs = []
    for n in passes:
        experiment = build_experiment("rule110-cpu", overrides | {"sleep.passes": str(n)})
        run = args.workdir / f"N{n}"
        shutil.rmtree(run, ignore_errors=True)  # the demo always trains from scratch
        task, model = experiment.task, experiment.config.model
        print(
            f"training N={n}: Rule 110 t={task.steps}, {task.num_strings} strings of width {task.width}, "
            f"window L={task.window} (hard eviction), d={model.d_model}, {len(model.layers)} blocks, "
            f"batch {experiment.train.batch_size}, {experiment.train.steps} steps"
        )
        run_training(experiment, run)
        runs.append(run)

    curves = {n: read_evals(run) for n, run in zip(passes, runs, strict=True)}
    chance = 1 / 2**task.num_strings
    print(f"\nheld-out exact accuracy (all {task.num_strings} labels right; chance {chance:.4f})")
    print("same data in the same order, same schedule and number of steps; only the number of passes N differs")
    print(f"{'step':>6} {'tokens':>9} " + " ".join(f"{'N=' + str(n):>8}" for n in passes))
    for i, record in enumerate(curves[passes[0]]):
        row = " ".join(f"{curves[n][i]['exact']:>8.3f}" for n in passes)
        print(f"{record['step']:>6} {record['tokens']:>9} {row}")
    plot = plot_runs(runs, "exact", args.workdir / "rule110_exact.png", title="Rule 110, held-out exact", chance=chance)
    summary = {f"N={n}": curves[n][-1] for n in passes}
    (args.workdir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"\noutputs: {plot} (plot), {args.workdir / 'summary.json'}, and per run {runs[0]}/metrics.jsonl")
