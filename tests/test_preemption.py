"""SIGTERM / SIGINT during `sleeplm train`: the step finishes, is checkpointed, the CLI exits with 75, and the next
`train` resumes bit-exactly (params and metrics.jsonl equal an uninterrupted run's). Two processes agree on the step."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from test_loop import TINY, records, restored_params

from sleeplm.cli.main import EXIT_PREEMPTED
from sleeplm.cli.main import main as cli_main
from sleeplm.training import run as loop
from sleeplm.training.checkpoint import Checkpointer
from sleeplm.training.presets import build_experiment

# Enough quick steps that the signal lands mid-run: every step logged, so metrics.jsonl shows the run's progress.
SETTINGS = TINY | {
    "train.steps": "40",
    "run.log_every": "1",
    "run.eval_every": "20",
    "run.checkpoint_every": "20",
    "run.eval_examples": "8",
    "run.eval_batch_size": "8",
}
ARGS = [f"--{k}={v}" for k, v in SETTINGS.items()]
TIMING = ("seconds", "timed_from_step")


def without_timing(run: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING} for r in records(run)]


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("straight") / "run"
    loop.run_training(build_experiment("rule110-cpu", SETTINGS), run)
    return run


def train_steps_logged(run: Path) -> int:
    try:
        return sum('"kind": "train"' in line for line in (run / "metrics.jsonl").read_text().splitlines())
    except FileNotFoundError:
        return 0


@pytest.mark.parametrize("signal_number", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_checkpoints_the_step_exits_75_and_the_run_resumes_bit_exactly(tmp_path, straight, signal_number):
    run = tmp_path / "run"
    command = [sys.executable, "-m", "sleeplm", "train", "--preset", "rule110-cpu", "--workdir", str(run), *ARGS]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while train_steps_logged(run) < 3 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    process.send_signal(signal_number)
    _, err = process.communicate(timeout=120)
    assert process.returncode == EXIT_PREEMPTED == 75, err[-3000:]
    name = signal.Signals(signal_number).name
    stopped = re.search(rf"preempted: stopped by {name} after step (\d+), checkpointed in (\S+)/(\d+)", err)
    assert stopped, err[-3000:]
    step = int(stopped.group(1))
    assert 3 <= step < 40 and int(stopped.group(3)) == step
    assert Checkpointer(run / "checkpoints", keep=2).latest_step() == step
    assert [r["step"] for r in records(run) if r["kind"] == "train"] == list(range(1, step + 1))

    cli_main(["train", "--preset", "rule110-cpu", "--workdir", str(run), *ARGS])  # resumes to the end
    assert without_timing(run) == without_timing(straight)
    experiment = build_experiment("rule110-cpu", SETTINGS)
    for a, b in zip(
        jax.tree.leaves(restored_params(straight, experiment)),
        jax.tree.leaves(restored_params(run, experiment)),
        strict=True,
    ):
        np.testing.assert_array_equal(a, b)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the run put the handlers back
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_two_processes_stop_at_the_same_step_when_one_gets_sigterm_and_resume(tmp_path):
    """Two localhost processes of 4 fake CPU devices each (jax.distributed, gloo), one (2, 2, 2) mesh: SIGTERM to
    process 1 only stops both after the same step (the preemption sync point), both checkpointed, and both resume
    to the end, as a one-device run trains."""
    from fake_devices import fake_cpu_devices
    from test_parallel import _free_port

    settings = SETTINGS | {"train.steps": "20", "run.eval_every": "10", "run.checkpoint_every": "10"}
    args = [f"--{k}={v}" for k, v in settings.items()]
    run = tmp_path / "two-hosts"
    command = [sys.executable, "-m", "sleeplm", "train", "--preset", "rule110-cpu", "--workdir", str(run)]
    command += ["--distributed", "--mesh", "data=2,fsdp=2,tensor=2", *args]

    def start_both() -> list[subprocess.Popen]:
        port = str(_free_port())
        hosts = []
        for index in (0, 1):
            env = fake_cpu_devices(4, dict(os.environ))
            env |= {
                "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
                "JAX_NUM_PROCESSES": "2",
                "JAX_PROCESS_ID": str(index),
                "JAX_CPU_COLLECTIVES_IMPLEMENTATION": "gloo",
            }
            hosts.append(subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env))
        return hosts

    hosts = start_both()
    deadline = time.monotonic() + 600
    while train_steps_logged(run) < 3 and all(h.poll() is None for h in hosts) and time.monotonic() < deadline:
        time.sleep(0.01)
    hosts[1].send_signal(signal.SIGTERM)
    outputs = [host.communicate(timeout=600) for host in hosts]
    steps = []
    for host, (_, err) in zip(hosts, outputs, strict=True):
        assert host.returncode == EXIT_PREEMPTED, err[-3000:]
        steps.append(int(re.search(r"preempted: stopped by SIGTERM after step (\d+)", err).group(1)))
    assert steps[0] == steps[1] and 3 <= steps[0] < 20, steps
    assert Checkpointer(run / "checkpoints", keep=2).latest_step() == steps[0]

    hosts = start_both()
    outputs = [host.communicate(timeout=600) for host in hosts]
    assert [h.returncode for h in hosts] == [0, 0], outputs[0][1][-3000:] + outputs[1][1][-3000:]
    straight = tmp_path / "straight"
    loop.run_training(build_experiment("rule110-cpu", settings), straight)
    train = [r for r in records(run) if r["kind"] == "train"]
    assert [r["step"] for r in train] == list(range(1, 21))
    expected = [r["loss"] for r in records(straight) if r["kind"] == "train"]
    np.testing.assert_allclose([r["loss"] for r in train], expected, rtol=1e-4)
