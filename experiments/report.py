"""Cross-sweep tables and plots of the CPU-scale reproduction, from each sweep's summary.json.

    python experiments/report.py [--results experiments/results]

Writes RESULTS/report.json, depth_gain.png (final exact vs Rule 110 depth, N=1 and N=2), SWEEP.png per sleep sweep
(rule110-sleep-tT, depo-1hop, arith-mix: final accuracy vs N, one dot per seed and eviction, the ceiling and floor as
lines) and the lm sweep's loss by position, and prints the Markdown tables used in RESULTS.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.ticker import MaxNLocator
from sweeps import CEILING, FLOOR, SLIDING  # experiments/sweeps.py, beside this script

from sleeplm.cli.plot import read_evals
from sleeplm.experiment.files import EXPERIMENT

RESULTS = Path(__file__).parent / "results"


def load(results: Path, sweep: str) -> dict:
    """The runs of one sweep's summary.json under `results` (empty if the sweep never ran)."""
    path = results / sweep / "summary.json"
    return json.loads(path.read_text())["runs"] if path.exists() else {}


def depth_table(n1: dict, n2: dict) -> tuple[list[dict], str]:
    depths = sorted({r["depth"] for r in [*n1.values(), *n2.values()]})
    rows = []
    for t in depths:
        a = next((r for r in n1.values() if r["depth"] == t), None)
        b = next((r for r in n2.values() if r["depth"] == t), None)
        rows.append({"depth": t, "N1": a and a["final_exact"], "N2": b and b["final_exact"]})
    lines = ["| Rule 110 depth t | N=1 final exact | N=2 final exact | N=2 - N=1 |", "|---|---|---|---|"]
    for r in rows:
        gain = f"{r['N2'] - r['N1']:+.3f}" if r["N1"] is not None and r["N2"] is not None else "—"
        cells = [f"{r[k]:.3f}" if r[k] is not None else "—" for k in ("N1", "N2")]
        lines.append(f"| {r['depth']} | {cells[0]} | {cells[1]} | {gain} |")
    return rows, "\n".join(lines)


def mean_and_standard_error(values: list[float]) -> tuple[float, float | None]:
    """The mean, and its standard error (sample standard deviation / sqrt(count); None for fewer than 2 values)."""
    mean = statistics.mean(values)
    return mean, (statistics.stdev(values) / len(values) ** 0.5 if len(values) > 1 else None)


def minutes(run: dict) -> str:
    """A run's wall minutes; a run resumed from a checkpoint older than time keeping says which part was timed."""
    timed = f"{run['seconds'] / 60:.1f}"
    return f"{timed} (steps {run['timed_from_step']}+)" if "timed_from_step" in run else timed


def sleep_table(runs: dict, metric: str = "exact", prefix: str = "") -> tuple[dict, str]:
    """Final held-out `metric` per N over seeds (runs named "{prefix}N{n}-s{seed}"; the bounds and other prefixes are
    left out), and each N's gain over N=1 on the same seed (same initialisation and data order: a paired
    comparison), with the mean gain's standard error."""
    seeded_run = re.compile(re.escape(prefix) + r"N\d+-(s\d+)")
    by_n: dict[int, dict[str, dict]] = {}
    for name, r in sorted(runs.items()):
        if seeded := seeded_run.fullmatch(name):
            by_n.setdefault(r["passes"], {})[seeded[1]] = r
    table = {}
    lines = [
        f"| N | seeds | final {metric} per seed | mean | spread | gain over N=1, same seed | mean gain ± s.e. "
        "| minutes per run |"
    ]
    lines.append("|---|---|---|---|---|---|---|---|")
    for n, rs in sorted(by_n.items()):
        finals = [r["final"][metric] for r in rs.values()]
        baseline = {seed: r["final"][metric] for seed, r in by_n.get(1, {}).items()}
        gains = [r["final"][metric] - baseline[seed] for seed, r in rs.items() if seed in baseline]
        timed = [r["seconds"] / 60 for r in rs.values() if "timed_from_step" not in r]  # timed from step 0
        table[n] = {
            "seeds": list(rs),
            "final": finals,
            "mean": statistics.mean(finals),
            "spread": max(finals) - min(finals),
            "paired_gain": gains,
            "minutes": statistics.mean(timed) if timed else None,
        }
        row = table[n]
        paired, summary = "—", "—"
        if n != 1 and gains:
            paired = ", ".join(f"{g:+.3f}" for g in gains)
            row["mean_gain"], row["gain_standard_error"] = mean_and_standard_error(gains)
            error = row["gain_standard_error"]
            summary = f"{row['mean_gain']:+.3f}" + (f" ± {error:.3f}" if error is not None else "")
        cost = "—" if row["minutes"] is None else f"{row['minutes']:.1f}"
        if len(timed) < len(rs):
            cost += f" ({len(timed)} of {len(rs)} timed)"
        lines.append(
            f"| {n} | {', '.join(rs)} | {', '.join(f'{f:.3f}' for f in finals)} | {row['mean']:.3f} "
            f"| {row['spread']:.3f} | {paired} | {summary} | {cost} |"
        )
    return table, "\n".join(lines)


def bounds_table(runs: dict, metric: str) -> tuple[dict, str]:
    """The sweep's ceiling (the hybrid without eviction) and floor (attention alone, evicted): final `metric`."""
    bounds = {name: runs[name]["final"][metric] for name in (CEILING, FLOOR) if name in runs}
    lines = [f"| bound | final {metric} | minutes |", "|---|---|---|"]
    lines += [f"| {name} | {value:.3f} | {minutes(runs[name])} |" for name, value in bounds.items()]
    return bounds, "\n".join(lines)


TAKE_OFF = 0.5  # held-out exact accuracy that marks a Rule 110 run as having learned the task


def take_off_step(run: Path, metric: str = "exact", level: float = TAKE_OFF) -> int | None:
    """The first evaluated step at which the run's held-out `metric` reached `level` (None: never)."""
    return next((e["step"] for e in read_evals(run) if e[metric] >= level), None)


def plain_table(runs: dict, sweep_dir: Path, metric: str = "exact", level: float = TAKE_OFF) -> str:
    """Per run: final and best held-out `metric`, the first step it reached `level`, and wall minutes."""
    lines = [f"| run | N | steps | final {metric} | best {metric} | first step with {metric} ≥ {level} | minutes |"]
    lines.append("|---|---|---|---|---|---|---|")
    for name, r in sorted(runs.items()):
        step = take_off_step(sweep_dir / name, metric, level)
        best = max(e[metric] for e in read_evals(sweep_dir / name))
        lines.append(
            f"| {name} | {r['passes']} | {r['steps']} | {r['final'][metric]:.3f} | {best:.3f} "
            f"| {step if step is not None else 'never'} | {minutes(r)} |"
        )
    return "\n".join(lines)


def per_group_table(runs: dict, prefix: str) -> str:
    """Final accuracy per group (Depo hop count "accuracy@k*", arithmetic op count "accuracy@ops*") for each run."""
    if not runs:
        return ""
    keys = sorted({k for r in runs.values() for k in r["final"] if k.startswith(prefix)}, key=lambda k: (len(k), k))
    lines = ["| run | N | eviction | " + " | ".join(k.removeprefix(prefix) for k in keys) + " |"]
    lines.append("|---" * (len(keys) + 3) + "|")
    for name, r in sorted(runs.items()):
        cells = " | ".join(f"{r['final'][k]:.3f}" if k in r["final"] else "—" for k in keys)
        lines.append(f"| {name} | {r['passes']} | {r['eviction']} | {cells} |")
    return "\n".join(lines)


def position_keys(record: dict) -> list[str]:
    """The loss-by-position keys of an evaluation ("loss@pos0-L", "loss@posL-2L", ...), nearest first."""
    keys = [k for k in record if k.startswith("loss@pos")]
    return sorted(keys, key=lambda k: _bucket_start(k.removeprefix("loss@pos")))


def _bucket_start(bucket: str) -> int:
    start = bucket.split("-")[0]
    return 0 if start == "0" else int(start.removesuffix("L") or 1)


def lm_table(runs: dict, sweep_dir: Path) -> tuple[dict, str]:
    """Final held-out perplexity and loss by position within the document for each language-modelling run."""
    if not runs:
        return {}, ""
    keys = position_keys(next(iter(runs.values()))["final"])
    lines = ["| run | layers | eviction | N | perplexity | " + " | ".join(k.removeprefix("loss@") for k in keys)]
    lines[0] += " | minutes |"
    lines.append("|---" * (len(keys) + 6) + "|")
    table = {}
    for name, r in runs.items():
        layers = json.loads((sweep_dir / name / EXPERIMENT).read_text())["config"]["model"]["layers"]
        final = r["final"]
        table[name] = {"layers": layers, "perplexity": final["perplexity"], **{k: final[k] for k in keys}}
        cells = " | ".join(f"{final[k]:.3f}" for k in keys)
        kinds = "/".join(dict.fromkeys(layers))
        lines.append(
            f"| {name} | {kinds} | {r['eviction']} | {r['passes']} | {final['perplexity']:.1f} | {cells} "
            f"| {minutes(r)} |"
        )
    return table, "\n".join(lines)


def lm_plot(runs: dict, sweep_dir: Path, path: Path) -> None:
    """Left: held-out loss by position within the document (final evaluation); right: perplexity while training."""
    figure, (by_position, curves) = plt.subplots(1, 2, figsize=(11, 3.9))
    for name, r in runs.items():
        keys = position_keys(r["final"])
        by_position.plot(range(len(keys)), [r["final"][k] for k in keys], marker="o", label=name)
        evals = read_evals(sweep_dir / name)
        curves.plot([e["tokens"] for e in evals], [e["perplexity"] for e in evals], label=name)
    by_position.set_xticks(range(len(keys)), [k.removeprefix("loss@pos") for k in keys])
    by_position.set(xlabel="position in the document", ylabel="held-out loss (nats/token)", title="loss by position")
    curves.set(xlabel="training tokens (incl. padding)", ylabel="held-out perplexity", yscale="log", title="training")
    for axes in (by_position, curves):
        axes.grid(alpha=0.3)
        axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


@contextlib.contextmanager
def final_accuracy_plot(path: Path, xlabel: str, title: str, metric: str = "exact", chance: float | None = 1 / 16):
    """Axes to draw final held-out accuracies on; chance (4 strings of Rule 110 by default) marked; saved to `path`
    on exit."""
    figure, axes = plt.subplots(figsize=(5.6, 3.8))
    yield axes
    if chance is not None:
        axes.axhline(chance, color="gray", linestyle="--", label="chance")
    axes.set(xlabel=xlabel, ylabel=f"held-out {metric} (final)", title=title)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


# Sleep sweeps (runs "N{n}-s{seed}", for some also "sliding-N{n}-s{seed}", a ceiling and a floor): the metric
# compared, its chance line, and the level whose first crossing times each run's learning (None: no such table).
SLEEP_SWEEPS = {
    "rule110-sleep-t*": ("exact", 1 / 16, None),
    "depo-1hop": ("accuracy", None, 0.9),
    "arith-mix": ("accuracy@ops1", 0.2, 0.5),  # one operation (the constant queries are a lookup)
}


def sleep_sweep_section(
    results: Path, sweep: str, metric: str, chance: float | None, level: float | None
) -> tuple[dict, str]:
    """The sweep's tables of N over seeds (hard eviction, then sliding where it ran), its bounds, each run's first
    step at `level` (if given), and results/SWEEP.png: final `metric` against N, one dot per seed, the bounds as
    lines."""
    runs = load(results, sweep)
    (hard, hard_markdown), (sliding, sliding_markdown) = sleep_table(runs, metric), sleep_table(runs, metric, SLIDING)
    bounds, bounds_markdown = bounds_table(runs, metric)
    with final_accuracy_plot(results / f"{sweep}.png", "passes N", f"{sweep}: sleep passes", metric, chance) as axes:
        for eviction, table, color in (("hard", hard, "C0"), ("sliding", sliding, "C1")):
            for n, row in table.items():
                axes.scatter([n] * len(row["final"]), row["final"], color=color)
            if table:
                means = [row["mean"] for row in table.values()]
                axes.plot(list(table), means, color=color, label=f"{eviction} eviction, mean over seeds")
        for (name, value), color in zip(bounds.items(), ("C2", "C3"), strict=False):
            axes.axhline(value, color=color, linestyle=":", label=name)
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    section, markdown = {"passes": hard, "bounds": bounds}, hard_markdown
    if sliding:
        section["sliding"] = sliding
        markdown = f"Hard eviction:\n\n{hard_markdown}\n\nSliding eviction:\n\n{sliding_markdown}"
    if bounds:
        markdown += "\n\n" + bounds_markdown
    if level is not None:
        markdown += "\n\n" + plain_table(runs, results / sweep, metric, level)
    return section, markdown


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=RESULTS, help="the folder of sweep results to report on")
    results = parser.parse_args().results
    if not results.is_dir():
        parser.error(f"--results {results} is not a folder of sweep results")
    depth_rows, depth_md = depth_table(load(results, "rule110-depth"), load(results, "rule110-depth-N2"))
    report: dict = {"depth": depth_rows}
    sections = ["## Depth\n\n" + depth_md]
    for pattern, (metric, chance, level) in SLEEP_SWEEPS.items():
        for path in sorted(results.glob(f"{pattern}/summary.json")):
            sweep = path.parent.name
            report[sweep], markdown = sleep_sweep_section(results, sweep, metric, chance, level)
            sections.append(f"## {sweep}\n\n{markdown}")
    for path in sorted(
        [*results.glob("rule110-baselines-t*/summary.json"), *results.glob("rule110-lr-t*/summary.json")]
    ):
        report[path.parent.name] = load(results, path.parent.name)
        sections.append(f"## {path.parent.name}\n\n" + plain_table(load(results, path.parent.name), path.parent))
    groups = (
        ("depo", "accuracy@k"),
        ("depo-2hops", "accuracy@k"),
        ("arith", "accuracy@ops"),
        ("arith-1op", "accuracy@ops"),
        ("arith-mix", "accuracy@ops"),
    )
    for sweep, prefix in groups:
        runs = load(results, sweep)
        if runs:
            report[sweep] = runs
            sections.append(f"## {sweep} (final held-out accuracy per group)\n\n" + per_group_table(runs, prefix))
    lm_runs = load(results, "lm")
    if lm_runs:
        report["lm"], markdown = lm_table(lm_runs, results / "lm")
        sections.append("## lm (final held-out perplexity and loss by position)\n\n" + markdown)
        lm_plot(lm_runs, results / "lm", results / "lm" / "loss_by_position.png")
    (results / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    with final_accuracy_plot(results / "depth_gain.png", "Rule 110 depth t", "Rule 110: depth vs passes") as axes:
        for key, label in (("N1", "N=1"), ("N2", "N=2")):
            points = [(r["depth"], r[key]) for r in depth_rows if r[key] is not None]
            if points:
                axes.plot(*zip(*points, strict=True), marker="o", label=label)
    print("\n\n".join(sections))


if __name__ == "__main__":
    main()
