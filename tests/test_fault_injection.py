"""Runs that fail part-way: a checkpoint write that fails (a full disk) leaves the previous checkpoint as the one
restored, and a run killed again and again (`fault_injection.py`) ends where an uninterrupted one does."""

from __future__ import annotations

import errno
import json
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from orbax.checkpoint._src.path import atomicity
from test_loop import losses, restored_params, tiny

from sleeplm.experiment.workdir import Workdir
from sleeplm.training import run as loop

HERE = Path(__file__).parent


def test_a_checkpoint_write_that_fails_part_way_leaves_the_previous_one(tmp_path, monkeypatch):
    experiment = tiny()
    straight = tmp_path / "straight"
    loop.run_training(experiment, straight)

    rename = atomicity.async_path.rename

    async def full_disk(source, target):  # step 6's files are written, its commit (the final rename) fails
        if Path(target).name == "6":
            raise OSError(errno.ENOSPC, "No space left on device", str(target))
        return await rename(source, target)

    monkeypatch.setattr(atomicity.async_path, "rename", full_disk)
    failing = tmp_path / "failing"
    with pytest.raises(OSError, match="No space left on device"):
        loop.run_training(experiment, failing)
    monkeypatch.setattr(atomicity.async_path, "rename", rename)

    assert Workdir(failing).checkpoints().latest_step() == 3  # the step-6 write never committed
    assert Workdir(failing).restore_params()[1] == 3
    loop.run_training(experiment, failing)  # resumes from step 3
    assert losses(failing) == losses(straight)
    for ours, theirs in zip(
        jax.tree.leaves(restored_params(failing, experiment)),
        jax.tree.leaves(restored_params(straight, experiment)),
        strict=True,
    ):
        np.testing.assert_array_equal(ours, theirs)


def test_a_run_killed_again_and_again_ends_bit_exact(tmp_path):
    out = tmp_path / "summary.json"
    script = [sys.executable, str(HERE / "fault_injection.py"), "--kills", "4", "--seed", "3", "--dir", str(tmp_path)]
    done = subprocess.run([*script, "--out", str(out)], capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads(out.read_text())
    assert summary["params_bit_exact"] and summary["metrics_records_equal"]
    assert summary["kills"] >= 1 and summary["final_step"] == 120
