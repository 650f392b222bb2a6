"""Training runs: resume equivalence, the non-finite guard (loss and gradient), checkpoint errors, the CLI and plots."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest

from sleeplm.cli.main import EXIT_NON_FINITE
from sleeplm.cli.main import main as cli_main
from sleeplm.experiment.overrides import override_experiment
from sleeplm.experiment.schema import Experiment, align_task_and_model
from sleeplm.experiment.workdir import CheckpointError
from sleeplm.training import run as loop
from sleeplm.training.checkpoint import Checkpointer
from sleeplm.training.presets import PRESETS, build_experiment
from sleeplm.training.step import init_train_state

TINY = {
    "task.width": "4",
    "task.num_strings": "2",
    "task.steps": "1",
    "sleep.window": "4",
    "sleep.passes": "2",
    "model.d_model": "16",
    "model.num_heads": "2",
    "model.layers": "attn,gdn",
    "model.mlp_dim": "32",
    "train.steps": "6",
    "train.batch_size": "8",
    "train.warmup_steps": "1",
    "run.eval_every": "3",
    "run.eval_examples": "16",
    "run.eval_batch_size": "16",
    "run.checkpoint_every": "3",
    "run.progress": "false",
}


def tiny(**overrides: str) -> Experiment:
    return build_experiment("rule110-cpu", TINY | overrides)


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def losses(run: Path) -> list[tuple]:
    return [(r["step"], r["kind"], r.get("loss"), r.get("exact")) for r in records(run)]


def restored_params(run: Path, experiment: Experiment):
    template = init_train_state(jax.random.key(0), experiment.config, experiment.train)
    checkpoints = Checkpointer(run / "checkpoints", keep=2)
    return checkpoints.restore(template, loop.train_iterator(experiment), experiment).params


def rewrite_records_at(run: Path, step: int, change) -> None:
    """Applies `change` to the metrics records of `step` (as if an earlier invocation had written them so)."""
    changed = [change(r) if r["step"] == step else r for r in records(run)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in changed))


def test_resume_equals_training_straight_through(tmp_path):
    experiment = tiny()
    straight, resumed, untimed = tmp_path / "straight", tmp_path / "resumed", tmp_path / "untimed"
    loop.run_training(experiment, straight)
    loop.run_training(experiment, resumed, stop_at=3)  # "crash" after step 3 (checkpointed)
    assert Checkpointer(resumed / "checkpoints", keep=2).latest_step() == 3
    shutil.copytree(resumed, untimed)
    # Pretend the first part took a day: the resumed part's wall time adds to it, read back from step 3's records.
    rewrite_records_at(resumed, 3, lambda r: r | {"seconds": 86400.0})
    loop.run_training(experiment, resumed)  # restores step 3, params, optimizer and the data position
    assert losses(resumed) == losses(straight)
    seconds = [(r["step"], r["kind"], r["seconds"]) for r in records(resumed)]
    assert [s[:2] for s in seconds] == [(s, "train") for s in range(1, 4)] + [(3, "eval")] + [
        (s, "train") for s in range(4, 7)
    ] + [(6, "eval")]
    later = [t for step, _, t in seconds if step > 3]
    assert all(86400.0 < t < 86400.0 + 600 for t in later) and later == sorted(later), seconds
    assert not any("timed_from_step" in r for r in records(resumed))
    # Step 3's records written before time keeping: the rest is timed from step 3 and says so.
    rewrite_records_at(untimed, 3, lambda r: {k: v for k, v in r.items() if k != "seconds"})
    loop.run_training(experiment, untimed)
    later = [r for r in records(untimed) if r["step"] > 3]
    assert all(r["timed_from_step"] == 3 and 0 < r["seconds"] < 600 for r in later), later
    for a, b in zip(
        jax.tree.leaves(restored_params(straight, experiment)),
        jax.tree.leaves(restored_params(resumed, experiment)),
        strict=True,
    ):
        np.testing.assert_array_equal(a, b)


def test_non_finite_loss_or_gradient_stops_before_saving(tmp_path, monkeypatch, capsys):
    real_step = loop.train_lib.train_step
    poison = {"loss": "loss"}

    def poisoned(state, batch, config, train):
        state, metrics = real_step(state, batch, config, train)
        key = poison["loss"]
        return state, metrics | {key: jax.numpy.where(state.step >= 5, jax.numpy.nan, metrics[key])}

    monkeypatch.setattr(loop.train_lib, "train_step", poisoned)
    experiment = tiny(**{"run.checkpoint_every": "1"})
    with pytest.raises(loop.NonFiniteLossError, match=r"training loss is nan at step 5: stopped before saving.*step 4"):
        loop.run_training(experiment, tmp_path / "run")
    assert Checkpointer(tmp_path / "run" / "checkpoints", keep=2).all_steps() == [3, 4]
    # A finite loss with a NaN gradient norm (Muon and AdamW would write NaN parameters) stops the same way, and
    # the CLI says so in one line with its own exit code.
    poison["loss"] = "grad_norm"
    args = [f"--{k}={v}" for k, v in (TINY | {"run.checkpoint_every": "1"}).items()]
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["train", "--preset", "rule110-cpu", "--workdir", str(tmp_path / "cli"), *args])
    assert exit_info.value.code == EXIT_NON_FINITE == 65
    assert Checkpointer(tmp_path / "cli" / "checkpoints", keep=2).all_steps() == [3, 4]
    err = capsys.readouterr().err.strip().splitlines()
    expected = r"error: gradient norm is nan at step 5: stopped before saving.*step 4"
    assert len(err) == 1 and re.fullmatch(expected, err[0]), err


def test_mismatched_and_corrupted_checkpoints_fail_clearly(tmp_path):
    experiment = tiny(**{"train.steps": "3"})
    run = tmp_path / "run"
    loop.run_training(experiment, run)
    with pytest.raises(
        CheckpointError, match=r"written for a different experiment: config.model.d_model: saved 16, now 32"
    ):
        loop.run_training(tiny(**{"train.steps": "3", "model.d_model": "32"}), run)
    for path in (run / "checkpoints" / "3" / "state").rglob("*"):
        if path.is_file() and path.stat().st_size > 64:
            path.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=r"checkpoint .*/3 is (corrupted|unreadable)"):
        loop.run_training(experiment, run)


def test_cli_train_eval_plot(tmp_path, capsys):
    run = tmp_path / "cli"
    args = [f"--{k}={v}" for k, v in (TINY | {"train.steps": "3"}).items()]
    cli_main(["train", "--preset", "rule110-cpu", "--workdir", str(run), *args])
    cli_main(["eval", "--workdir", str(run)])
    assert json.loads((run / "eval_step3.json").read_text())["step"] == 3
    other = tmp_path / "other"
    shutil.copytree(run, other)
    cli_main(["plot", str(run), str(other), "--out", str(tmp_path / "p.png"), "--chance", "0.25"])
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "wrote" in capsys.readouterr().out

    # Generation and scoring from the run's checkpoint; prompts are the task's tokens.
    cli_main(["generate", "--workdir", str(run), "--prompt", "0 1 1 <query>", "--prompt", "1", "--max-new-tokens", "3"])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [len(row["ids"]) for row in rows] == [3, 3]
    assert all(len(row["text"].split()) == 3 for row in rows)  # decoded with the task's vocabulary
    np.save(tmp_path / "ids.npy", np.random.default_rng(0).integers(0, 4, 30))
    cli_main(
        ["score", "--workdir", str(run), "--ids-file", str(tmp_path / "ids.npy"), "--out", str(tmp_path / "s.json")]
    )
    scored = json.loads((tmp_path / "s.json").read_text())
    assert scored["tokens"] == 29 and scored["perplexity"] > 1 and scored["step"] == 3
    with pytest.raises(SystemExit, match=r"tokens \['2'\] are not in the vocabulary"):
        cli_main(["generate", "--workdir", str(run), "--prompt", "0 2"])


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["train", "--preset", "nope", "--workdir", "x"], r"preset 'nope' is unknown"),
        (
            ["train", "--preset", "rule110-cpu", "--workdir", "x", "--sleep.passes", "two"],
            r"--sleep.passes 'two' is invalid",
        ),
        (["train", "--preset", "rule110-cpu", "--workdir", "x", "--sleep.passes", "0"], r"sleep.passes=0 is invalid"),
        (["train", "--preset", "rule110-cpu", "--workdir", "x", "--sleep.eviction", "soft"], r"sleep.eviction='soft'"),
        (["train", "--preset", "rule110-cpu", "--workdir", "x", "--task.widht", "3"], r"--task.widht is invalid"),
        (["train", "--preset", "rule110-cpu", "--workdir", "x", "steps"], r"unexpected argument 'steps'"),
        (["eval", "--workdir", "/nonexistent"], r"experiment.json does not exist"),
    ],
)
def test_bad_cli_values_fail_clearly(argv, message):
    with pytest.raises(SystemExit, match=message):
        cli_main(argv)


def test_every_preset_builds_consistently():
    for name, preset in PRESETS.items():
        experiment = align_task_and_model(override_experiment(preset, {}))
        assert experiment.task.window == experiment.config.sleep.window, name
        assert experiment.config.model.vocab_size >= 4, name
