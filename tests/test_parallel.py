"""Sharded training on 8 fake CPU devices (in a subprocess: the device count must be set before jax starts) against
the single-device run, for meshes (data, fsdp, tensor) = (8,1,1), (2,4,1), (2,2,2), (1,2,4)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from sleeplm.parallel.mesh import MeshConfig


@pytest.fixture(scope="module")
def results() -> dict:
    script = Path(__file__).with_name("multidevice_check.py")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=900, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULTS ")]
    assert done.returncode == 0 and lines, done.stderr[-3000:]
    return json.loads(lines[-1][len("RESULTS ") :])


MESHES = ["(8, 1, 1)", "(2, 4, 1)", "(2, 2, 2)", "(1, 2, 4)"]


@pytest.mark.parametrize("mesh", MESHES)
def test_three_sharded_steps_match_one_device(results, mesh):
    assert results["devices"] == 8
    run = results["meshes"][mesh]
    np.testing.assert_allclose(run["losses"], results["reference_losses"], rtol=1e-5)
    assert run["params_error"] < 1e-6


@pytest.mark.parametrize(
    ("mesh", "shard_shape"),
    [("(8, 1, 1)", [32, 64]), ("(2, 4, 1)", [8, 64]), ("(2, 2, 2)", [16, 32]), ("(1, 2, 4)", [16, 16])],
)
def test_params_and_optimizer_state_are_sharded_by_the_rules(results, mesh, shard_shape):
    run = results["meshes"][mesh]  # mlp "up" kernel (d_model=32, mlp=64): (embed -> fsdp, mlp -> tensor)
    assert run["up_spec"] == run["up_opt_spec"] == ["fsdp", "tensor"]
    assert run["up_shard_shape"] == shard_shape
    assert run["embedding_spec"] == [None, "fsdp"]


def test_eval_and_streaming_under_a_mesh(results):
    run = results["meshes"]["(2, 2, 2)"]
    assert run["logits_error"] < 1e-5 and run["stream_error"] < 1e-5
    assert run["kv_spec"] == [["data", "fsdp"], None, "tensor", None]  # (batch, slots, heads, dim)
    assert run["fast_weight_spec"] == [["data", "fsdp"], "tensor", None, None]  # (batch, heads, d_k, d_v)


def test_data_parallel_replicates_params_and_splits_the_optimizer_state(results):
    assert results["dp_params_error"] < 1e-6
    assert results["dp_up_spec"] == [None, None]
    assert results["dp_up_opt_spec"] == [["data", "fsdp"], None]  # ZeRO-1: the embed dim over the batch axes


def test_pallas_kernels_run_per_shard_under_a_mesh(results):
    assert results["pallas_error"] < 1e-6  # shard_map over (data, fsdp) x tensor == the unsharded call
    assert results["pallas_grad_spec"] == [["data", "fsdp"], None, "tensor", None]


def test_a_mesh_that_does_not_divide_the_model_fails_clearly(results):
    assert "model.num_heads=4 is split over tensor = 3 devices" in results["tensor3_error"]


@pytest.mark.parametrize(
    ("text", "devices", "shape"),
    [("data=2,fsdp=2,tensor=2", 8, (2, 2, 2)), ("fsdp=4", 8, (2, 4, 1)), ("data=1,fsdp=-1", 8, (1, 8, 1))],
)
def test_mesh_config(text, devices, shape):
    assert MeshConfig.parse(text).shape(devices) == shape


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("data=3", r"needs 3 devices, have 8"),
        ("pipe=2", r"mesh entry 'pipe=2' is invalid"),
        ("data=-1,fsdp=-1", r"at most one -1"),
        ("fsdp=3", r"3 does not divide the 8 devices"),
    ],
)
def test_bad_mesh_configs(text, message):
    with pytest.raises(ValueError, match=message):
        MeshConfig.parse(text).shape(8)


def _check_command(devices: int, phase: str, workdir: Path) -> list[str]:
    return [sys.executable, str(Path(__file__).with_name("reshard_check.py")), str(devices), phase, str(workdir)]


def _results(done: subprocess.CompletedProcess) -> dict:
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULTS ")]
    assert done.returncode == 0 and lines, done.stderr[-3000:]
    return json.loads(lines[-1][len("RESULTS ") :])


def _run_check(devices: int, phase: str, workdir: Path) -> dict:
    return _results(
        subprocess.run(_check_command(devices, phase, workdir), capture_output=True, text=True, timeout=900)
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_cli_trains_on_8_devices_and_checkpoints_restore_on_4_and_1_and_two_processes_agree(tmp_path):
    saved = tmp_path / "run8"
    assert _run_check(8, "save8", saved)["devices"] == 8  # the CLI, on a (2, 2, 2) mesh, stopped at step 3
    assert (saved / "checkpoints" / "3").is_dir() and (saved / "metrics.jsonl").exists()
    shutil.copytree(saved, tmp_path / "run4")
    shutil.copytree(saved, tmp_path / "run1")
    on4 = _run_check(4, "resume4", tmp_path / "run4")
    on1 = _run_check(1, "resume1", tmp_path / "run1")
    assert on4["devices"] == 4 and on1["devices"] == 1
    straight = on1["straight"]
    for resumed in (on4, on1["resumed"]):
        np.testing.assert_allclose(resumed["losses"], straight["losses"], rtol=1e-5)
        np.testing.assert_allclose(resumed["params"], straight["params"], rtol=1e-4, atol=1e-6)

    # Two processes of 4 devices each, coordinated by jax.distributed (the CLI's --distributed), one (2, 2, 2) mesh.
    env = dict(os.environ, SLEEPLM_TEST_PORT=str(_free_port()))
    run = tmp_path / "two-hosts"
    hosts = [
        subprocess.Popen(
            _check_command(4, f"host{i}", run), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
        )
        for i in (0, 1)
    ]
    outputs = [host.communicate(timeout=900) for host in hosts]
    both = _results(subprocess.CompletedProcess([], hosts[0].returncode, *outputs[0]))
    assert hosts[1].returncode == 0, outputs[1][1][-3000:]
    assert both["processes"] == 2 and both["devices"] == 8
    train = [r["loss"] for r in both["records"] if r["kind"] == "train"]
    evals = [r for r in both["records"] if r["kind"] == "eval"]
    np.testing.assert_allclose(train, straight["losses"], rtol=1e-5)
    assert [e["step"] for e in evals] == [e["step"] for e in straight["evals"]]
    for multi, single in zip(evals, straight["evals"], strict=True):  # held-out metrics from host batches
        np.testing.assert_allclose(multi["loss"], single["loss"], rtol=1e-5)
        assert multi["exact"] == single["exact"] and multi["accuracy"] == single["accuracy"]
