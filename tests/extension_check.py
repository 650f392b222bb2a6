# ruff: noqa: E402
"""Run in a subprocess with 8 fake CPU devices (see test_kinds.py): the toy mixer kind and task that test_kinds.py
registers train for 3 steps on a (2, 2, 2) mesh and on one device. Prints "RESULTS <json>"."""

from __future__ import annotations

from fake_devices import fake_cpu_devices

fake_cpu_devices(8)  # before jax starts

import json
import sys
import tempfile
from pathlib import Path

import jax

sys.path.insert(0, str(Path(__file__).parent))
from test_kinds import recall_experiment

from sleeplm.core.state import init_state
from sleeplm.parallel.mesh import MeshConfig, make_mesh, sleep_state_shardings
from sleeplm.training.run import run_training
from sleeplm.training.sharded import ShardedTraining


def records(run: Path) -> dict:
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in lines if r["kind"] == "eval"]
    return {"losses": [r["loss"] for r in lines if r["kind"] == "train"], "eval_loss": evals[-1]["loss"]}


def spec(sharding, ndim: int) -> list:
    entries = list(sharding.spec) + [None] * (ndim - len(sharding.spec))
    return [list(e) if isinstance(e, tuple) else e for e in entries]


def main() -> None:
    experiment = recall_experiment()
    mesh = make_mesh(MeshConfig(2, 2, 2))
    with tempfile.TemporaryDirectory() as tmp:
        run_training(experiment, Path(tmp) / "single")
        run_training(experiment, Path(tmp) / "sharded", mesh=mesh)
        results = {"devices": jax.device_count(), "single": records(Path(tmp) / "single")}
        results["sharded"] = records(Path(tmp) / "sharded")
    sharded = ShardedTraining.create(experiment.config, experiment.train, mesh)
    state = init_state(experiment.config, 8)
    mean = sleep_state_shardings(state, mesh, sharded.rules, experiment.config).caches[0].mean
    into = sharded.state_shardings.params["params"]["blocks_0"]["running_mean"]["into"]["kernel"]
    results |= {"mean_spec": spec(mean, 3), "into_spec": spec(into, 2)}
    print("RESULTS " + json.dumps(results))


if __name__ == "__main__":
    main()
