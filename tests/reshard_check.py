"""Subprocess driver for test_parallel.py's checkpoint tests: `reshard_check.py DEVICES PHASE WORKDIR`.

host0, host1: one of two processes (DEVICES fake devices each) of a multi-host run, coordinated through
   jax.distributed on localhost (port from SLEEPLM_TEST_PORT): the CLI trains the tiny experiment to the end on a
   (2, 2, 2) mesh spanning both, evaluating on the way; process 0 reports the losses and evaluations.

save8:   the CLI trains the tiny Rule 110 experiment on a (2, 2, 2) mesh of 8 fake devices, stopping at step 3.
resume4: continues that checkpoint to the end on a (2, 1, 2) mesh of 4 devices.
resume1: continues it on one device, and also trains the same experiment straight through on one device.
Prints "RESULTS <json>" with the final params' checksum-free comparison data (losses and flattened params).
"""

from __future__ import annotations

import os
import sys

from fake_devices import fake_cpu_devices

devices, phase, workdir = int(sys.argv[1]), sys.argv[2], sys.argv[3]
fake_cpu_devices(devices)
if phase.startswith("host"):  # what a launcher sets on each host (see sleeplm.cli._initialize_distributed)
    os.environ |= {
        "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{os.environ['SLEEPLM_TEST_PORT']}",
        "JAX_NUM_PROCESSES": "2",
        "JAX_PROCESS_ID": phase.removeprefix("host"),
        "JAX_CPU_COLLECTIVES_IMPLEMENTATION": "gloo",
    }

import json  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from test_loop import TINY, restored_params  # noqa: E402

from sleeplm.cli.main import main as cli_main  # noqa: E402
from sleeplm.parallel.mesh import MeshConfig, make_mesh  # noqa: E402
from sleeplm.training.presets import build_experiment  # noqa: E402
from sleeplm.training.run import run_training  # noqa: E402

experiment = build_experiment("rule110-cpu", TINY)


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def summary(run: Path) -> dict:
    params = np.concatenate([np.ravel(x) for x in jax.tree.leaves(restored_params(run, experiment))])
    evals = [r for r in records(run) if r["kind"] == "eval"]
    return {
        "losses": [r["loss"] for r in records(run) if r["kind"] == "train"],
        "params": params.tolist(),
        "evals": evals,
    }


if phase == "save8":
    overrides = [f"--{k}={v}" for k, v in TINY.items()]
    cli_main(
        [
            "train",
            "--preset",
            "rule110-cpu",
            "--workdir",
            workdir,
            "--mesh",
            "data=2,fsdp=2,tensor=2",
            "--stop-at",
            "3",
            *overrides,
        ]
    )
    print("RESULTS " + json.dumps({"devices": jax.device_count()}))
elif phase == "resume4":
    run_training(experiment, Path(workdir), mesh=make_mesh(MeshConfig(data=2, fsdp=1, tensor=2)))
    print("RESULTS " + json.dumps(summary(Path(workdir)) | {"devices": jax.device_count()}))
elif phase.startswith("host"):
    overrides = [f"--{k}={v}" for k, v in TINY.items()]
    mesh = ["--mesh", "data=2,fsdp=2,tensor=2"]
    cli_main(["train", "--preset", "rule110-cpu", "--workdir", workdir, "--distributed", *mesh, *overrides])
    if jax.process_index() == 0:
        run = {"processes": jax.process_count(), "devices": jax.device_count(), "records": records(Path(workdir))}
        print("RESULTS " + json.dumps(run))
elif phase == "resume1":
    run_training(experiment, Path(workdir))
    straight = Path(workdir + "-straight")
    run_training(experiment, straight)
    print(
        "RESULTS "
        + json.dumps({"resumed": summary(Path(workdir)), "straight": summary(straight), "devices": jax.device_count()})
    )
