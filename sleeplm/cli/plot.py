"""Learning curves from runs' metrics.jsonl files, one line per run, as a PNG."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from sleeplm.experiment.workdir import Workdir


def read_records(run: Path) -> list[dict]:
    """Every record of a run's metrics.jsonl, in order."""
    path = Workdir(run).metrics_path
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: is {run} a training run directory?")
    return [json.loads(line) for line in path.read_text().splitlines()]


def read_evals(run: Path) -> list[dict]:
    return [r for r in read_records(run) if r["kind"] == "eval"]


def run_label(run: Path) -> str:
    record = Workdir(run).record()
    sleep = record["config"]["sleep"]
    return f"{Path(run).name}: N={sleep['passes']}, L={sleep['window']}, {sleep['eviction']}"


def plot_runs(runs: list[Path], metric: str, out: Path, title: str = "", chance: float | None = None) -> Path:
    """Plots `metric` against training tokens for each run; marks chance if given."""
    figure, axes = plt.subplots(figsize=(6.4, 4.0))
    for run in runs:
        evals = read_evals(run)
        if evals and metric not in evals[0]:
            raise ValueError(f"metric {metric!r} is not in {run}'s evaluations: choose one of {sorted(evals[0])}")
        axes.plot([r["tokens"] for r in evals], [r[metric] for r in evals], marker="o", label=run_label(run))
    if chance is not None:
        axes.axhline(chance, color="gray", linestyle="--", label=f"chance {chance:.3f}")
    axes.set_xlabel("training tokens (real: padding not counted)")
    axes.set_ylabel(f"held-out {metric}")
    axes.set_title(title or metric)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(out, dpi=120)
    plt.close(figure)
    return out
