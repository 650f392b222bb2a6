"""The suite's outputs: results.json and, per task, the depth-by-length accuracy map heatmap_TASK.png."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from sleeplm.experiment.files import atomic_write

RESULTS = "results.json"


def heatmap_name(task: str) -> str:
    return f"heatmap_{task}.png"


def tokens_label(length: int) -> str:
    """1024 -> "1k", 1048576 -> "1M", 1000 -> "1000"."""
    for size, suffix in ((1 << 20, "M"), (1 << 10, "k")):
        if length % size == 0:
            return f"{length // size}{suffix}"
    return str(length)


def plot_heatmap(results: dict, task: str, path: Path) -> Path:
    """Accuracy of `task`'s cells: needle depth (rows, 0% at the top) by context length (columns)."""
    depths, lengths = sorted(results["depths"]), sorted(results["lengths"])
    grid = np.full((len(depths), len(lengths)), np.nan)
    for cell in results["summary"]:
        if cell["task"] == task:
            grid[depths.index(cell["depth"]), lengths.index(cell["length"])] = cell["accuracy"]
    figure, axes = plt.subplots(figsize=(1.2 + 0.9 * len(lengths), 1.2 + 0.5 * len(depths)))
    image = axes.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
    for (row, column), value in np.ndenumerate(grid):
        axes.text(column, row, f"{value:.2f}", ha="center", va="center", fontsize=8)
    axes.set_xticks(range(len(lengths)), [tokens_label(n) for n in lengths])
    axes.set_yticks(range(len(depths)), [f"{d:g}%" for d in depths])
    axes.set_xlabel("context length (tokens)")
    axes.set_ylabel("needle depth")
    axes.set_title(f"{task} ({results['tasks'][task]['metric']} match)")
    figure.colorbar(image, ax=axes, label="accuracy")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def write_report(results: dict, out: Path) -> list[Path]:
    """Writes results.json and one heatmap per task into `out` (created); returns their paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = [atomic_write(out / RESULTS, json.dumps(results, indent=2) + "\n")]
    return written + [plot_heatmap(results, task, out / heatmap_name(task)) for task in results["tasks"]]
