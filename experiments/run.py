"""Runs one sweep of the CPU-scale reproduction and writes its results as they come.

    python experiments/run.py SWEEP [--muon-lr LR] [--only NAME,...] [--workdir runs/experiments]
                                    [--results experiments/results]

SWEEP is one of experiments/sweeps.py's: rule110-depth, rule110-depth-N2, rule110-lr-tT, rule110-sleep-tT,
rule110-baselines-tT (T the Rule 110 depth), depo, depo-1hop, depo-2hops, arith, arith-1op, arith-mix, lm. Each run
trains in WORKDIR/SWEEP/NAME (resuming from its last checkpoint if cut off); when it finishes, its metrics and
experiment are copied to RESULTS/SWEEP/ with time.json (wall seconds summed over the run's invocations), and the
sweep's summary.json and plot are rewritten, so a sweep stopped halfway keeps every finished run. Finished runs are
skipped on a rerun.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import jax

sys.path.insert(0, str(Path(__file__).parent))
from sweeps import TUNED_MUON_LR, sweeps

from sleeplm.cli.plot import plot_runs, read_evals, read_records
from sleeplm.experiment.files import EXPERIMENT, METRICS
from sleeplm.training.presets import build_experiment
from sleeplm.training.run import last_timing, run_training

RESULTS = Path(__file__).parent / "results"


def provenance(argv: list[str], script: str = "experiments/run.py") -> dict:
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=False).stdout.strip()
    return {
        "command": " ".join(["python", script, *argv]),
        "commit": commit or "unknown",
        "machine": f"{platform.machine()} {platform.processor() or ''} {__import__('os').cpu_count()} cpus",
        "jax": jax.__version__,
    }


def summarize(sweep: str, out: Path, info: dict) -> None:
    """summary.json (final and best held-out exact accuracy per run, with its config) and a plot of the learning
    curves: exact.png for Rule 110 (chance marked), accuracy.png for Depo and arithmetic."""
    runs = sorted(p for p in out.iterdir() if p.is_dir() and (p / METRICS).exists())
    summary = dict(info, runs={})
    for run in runs:
        evals = read_evals(run)
        record = json.loads((run / EXPERIMENT).read_text())
        summary["runs"][run.name] = {
            "final_exact": evals[-1]["exact"],
            "best_exact": max(e["exact"] for e in evals),
            "final_loss": evals[-1]["loss"],
            "steps": evals[-1]["step"],
            "tokens": evals[-1]["tokens"],
            **json.loads((run / "time.json").read_text()),  # seconds, and timed_from_step if partly timed
            "passes": record["config"]["sleep"]["passes"],
            "eviction": record["config"]["sleep"]["eviction"],
            "depth": record["task"].get("steps"),
            "final": evals[-1],
        }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    if runs:
        strings = json.loads((runs[0] / EXPERIMENT).read_text())["task"].get("num_strings")
        metric, chance = ("exact", 1 / 2**strings) if strings else ("accuracy", None)
        if "perplexity" in read_evals(runs[0])[0]:  # language modelling
            metric = "perplexity"
        plot_runs(runs, metric, out / f"{metric}.png", title=f"{sweep}: held-out {metric}", chance=chance)


def as_recorded(experiment) -> dict:
    """The experiment as its experiment.json reads back (tuples become lists), for comparing with a finished run."""
    return json.loads(json.dumps(experiment.to_json()))


def finished_twin(experiment, results: Path) -> Path | None:
    """A finished run of any sweep under `results` with exactly this experiment, if any."""
    wanted = as_recorded(experiment)
    for record in results.glob(f"*/*/{EXPERIMENT}"):
        if (record.parent / "time.json").exists() and json.loads(record.read_text()) == wanted:
            return record.parent
    return None


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep")
    parser.add_argument(
        "--muon-lr", default=TUNED_MUON_LR, help="the N=1 Muon learning rate (default: tuned by rule110-lr-t3 and -t4)"
    )
    parser.add_argument("--workdir", type=Path, default=Path("runs/experiments"))
    parser.add_argument("--results", type=Path, default=RESULTS, help="where finished runs and summaries go")
    parser.add_argument("--only", default="", help="comma-separated run names, run in this order (default: all)")
    args = parser.parse_args(argv)
    all_sweeps = sweeps(args.muon_lr)
    if args.sweep not in all_sweeps:
        parser.error(f"sweep {args.sweep!r} is unknown: choose one of {sorted(all_sweeps)}")
    out = args.results / args.sweep
    out.mkdir(parents=True, exist_ok=True)
    info = {"provenance": provenance(argv), "muon_lr": args.muon_lr}
    only = [name for name in args.only.split(",") if name]  # also the order to run them in
    runs = {run.name: run for run in all_sweeps[args.sweep]}
    for name in only:
        if name not in runs:
            parser.error(f"--only {name!r}: {args.sweep} has the runs {sorted(runs)}")
    for run in [runs[name] for name in only] if only else runs.values():
        experiment = build_experiment(run.preset, run.overrides)
        if (out / run.name / "time.json").exists():
            if json.loads((out / run.name / EXPERIMENT).read_text()) != as_recorded(experiment):
                sys.exit(f"{out / run.name} holds a different experiment (another --muon-lr?): move it away first")
            continue
        done = finished_twin(experiment, args.results)
        if done is not None:  # the identical run (same settings and seed) finished in another sweep: reuse it
            print(f"[{args.sweep}] {run.name}: the same run as {done.relative_to(args.results)}, copied", flush=True)
            shutil.copytree(done, out / run.name, dirs_exist_ok=True)
        else:
            print(f"[{args.sweep}] {run.name}: {run.overrides}", flush=True)
            workdir = args.workdir / args.sweep / run.name
            run_training(experiment, workdir)
            (out / run.name).mkdir(exist_ok=True)
            for name in (METRICS, EXPERIMENT):
                shutil.copy(workdir / name, out / run.name / name)
            (out / run.name / "time.json").write_text(json.dumps(last_timing(read_records(workdir))) + "\n")
        summarize(args.sweep, out, info)
    summarize(args.sweep, out, info)


if __name__ == "__main__":
    main()
