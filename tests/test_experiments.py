"""The reproduction's bookkeeping (experiments/): every sweep's runs are valid experiments, and run.py skips a
finished run, copies a run identical to one finished in another sweep, refuses to mix a finished run with other
settings, and summarises Rule 110, Depo and arithmetic sweeps. No training: a finished run is faked on disk."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "experiments"))
import arith_diagnosis
import budget
import report
import run as run_script
from sweeps import TUNED_MUON_LR, Run, sweeps

from sleeplm.data import batched, make_source
from sleeplm.data.arith import ArithConfig
from sleeplm.training.flops import train_flops
from sleeplm.training.presets import build_experiment
from sleeplm.training.run import last_timing

ALL = sweeps(TUNED_MUON_LR)


def test_every_sweep_run_is_a_valid_experiment_with_a_unique_name():
    for sweep, runs in ALL.items():
        assert len({run.name for run in runs}) == len(runs), sweep
        for run in runs:
            build_experiment(run.preset, run.overrides)


def _fake_finished(results: Path, sweep: str, run: Run, exact: float = 0.5, **metrics: float) -> None:
    """What run.py leaves for a finished run: experiment.json, metrics.jsonl with an eval record, time.json."""
    out = results / sweep / run.name
    out.mkdir(parents=True)
    (out / "experiment.json").write_text(json.dumps(build_experiment(run.preset, run.overrides).to_json()))
    record = {"step": 600, "kind": "eval", "tokens": 10, "loss": 0.1, "exact": exact, "accuracy": 0.9} | metrics
    (out / "metrics.jsonl").write_text(json.dumps(record) + "\n")
    (out / "time.json").write_text(json.dumps({"seconds": 1.0}))


@pytest.fixture
def no_training(monkeypatch):
    def train(*args, **kwargs):
        raise AssertionError("run.py trained a run it should have skipped or copied")

    monkeypatch.setattr(run_script, "run_training", train)


def _by_name(sweep: str) -> dict[str, Run]:
    return {run.name: run for run in ALL[sweep]}


def test_finished_runs_are_skipped_identical_ones_copied_and_different_ones_refused(tmp_path, no_training):
    dirs = ["--results", str(tmp_path), "--workdir", str(tmp_path / "work")]
    _fake_finished(tmp_path, "rule110-sleep-t4", _by_name("rule110-sleep-t4")["N1-s0"], exact=0.25)
    run_script.main(["rule110-sleep-t4", "--only", "N1-s0", *dirs])
    # The learning-rate sweep's run at the tuned rate is the same experiment: copied, not trained.
    tuned = f"lr{TUNED_MUON_LR}"
    run_script.main(["rule110-lr-t4", "--only", tuned, *dirs])
    summary = json.loads((tmp_path / "rule110-lr-t4" / "summary.json").read_text())
    assert summary["runs"][tuned]["final_exact"] == 0.25
    assert summary["muon_lr"] == TUNED_MUON_LR and "commit" in summary["provenance"]
    assert (tmp_path / "rule110-lr-t4" / "exact.png").exists()
    with pytest.raises(SystemExit, match=r"rule110-sleep-t4/N1-s0 holds a different experiment"):
        run_script.main(["rule110-sleep-t4", "--only", "N1-s0", "--muon-lr", "1e-3", *dirs])


def test_depo_and_arithmetic_sweeps_are_summarised_by_accuracy(tmp_path, no_training):
    for sweep, name in (("depo", "N1"), ("arith", "hard-N1")):
        _fake_finished(tmp_path, sweep, _by_name(sweep)[name])
        run_script.main([sweep, "--only", name, "--results", str(tmp_path)])
        assert (tmp_path / sweep / "accuracy.png").exists()


def test_the_language_modelling_sweep_reports_perplexity_and_loss_by_position(
    tmp_path, no_training, monkeypatch, capsys
):
    by_position = {"loss@pos0-L": 3.0, "loss@posL-2L": 2.5, "loss@pos2L-4L": 2.25, "loss@pos4L-8L": 2.0}
    for i, name in enumerate(("N1", "N2")):
        metrics = {key: value - 0.1 * i for key, value in by_position.items()}
        _fake_finished(tmp_path, "lm", _by_name("lm")[name], perplexity=12.0 - i, **metrics)
        run_script.main(["lm", "--only", name, "--results", str(tmp_path)])
    assert (tmp_path / "lm" / "perplexity.png").exists()
    monkeypatch.setattr(sys, "argv", ["report.py", "--results", str(tmp_path)])
    report.main()
    table = capsys.readouterr().out.split("## lm")[1]
    assert "| N2 | attn/gdn | hard | 2 | 11.0 | 2.900 | 2.400 | 2.150 | 1.900 |" in table  # nearest position first
    assert (tmp_path / "lm" / "loss_by_position.png").exists()


def test_an_unknown_run_name_is_rejected_with_the_choices(capsys):
    with pytest.raises(SystemExit):
        run_script.main(["depo", "--only", "N3"])
    assert "--only 'N3': depo has the runs ['N1', 'N2', 'N4']" in capsys.readouterr().err


def test_sleep_table_pairs_seeds_and_gives_the_mean_gain_with_its_standard_error():
    finals = {"N1-s0": 0.2, "N1-s1": 0.4, "N1-s2": 0.3, "N2-s0": 0.5, "N2-s1": 0.4, "N2-s2": 0.6, "N4-s1": 0.9}
    runs = {name: {"passes": int(name[1]), "final": {"exact": f}, "seconds": 60.0} for name, f in finals.items()}
    runs[report.CEILING] = {"passes": 1, "final": {"exact": 1.0}, "seconds": 60.0}  # a bound, not a seed of N=1
    for n, final in ((1, 0.1), (2, 0.7)):  # sliding eviction: its own table, paired with sliding N=1
        runs[f"{report.SLIDING}N{n}-s0"] = {"passes": n, "final": {"exact": final}, "seconds": 60.0}
    sliding, _ = report.sleep_table(runs, prefix=report.SLIDING)
    assert sliding[1]["final"] == [0.1] and sliding[2]["paired_gain"] == pytest.approx([0.6])
    table, markdown = report.sleep_table(runs)
    assert table[1]["seeds"] == ["s0", "s1", "s2"] and table[1]["mean"] == pytest.approx(0.3)
    assert table[2]["paired_gain"] == pytest.approx([0.3, 0.0, 0.3])  # s0, s1, s2 against N=1 on the same seed
    assert table[2]["mean_gain"] == pytest.approx(0.2)
    assert table[2]["gain_standard_error"] == pytest.approx(0.1)  # sample sd sqrt(0.03) over sqrt(3)
    assert table[4]["paired_gain"] == pytest.approx([0.5]) and table[4]["gain_standard_error"] is None
    assert "| +0.200 ± 0.100 |" in markdown and "| +0.500 |" in markdown


def test_a_runs_time_comes_from_its_last_timed_record_and_a_partly_timed_run_is_named(tmp_path):
    records = [{"step": 10, "kind": "train", "seconds": 30.0}, {"step": 20, "kind": "train", "seconds": 75.0}]
    records.append({"step": 20, "kind": "eval", "exact": 0.5, "seconds": 80.0})
    assert last_timing(records) == {"seconds": 80.0}
    records[-1]["timed_from_step"] = 10  # resumed at step 10 from records written before time keeping
    assert last_timing(records) == {"seconds": 80.0, "timed_from_step": 10}
    assert last_timing([{"step": 10, "kind": "train"}]) is None
    run = _by_name("arith-mix")["N2-s1"]
    _fake_finished(tmp_path, "arith-mix", run)
    (tmp_path / "arith-mix" / run.name / "time.json").write_text(json.dumps({"seconds": 1.0, "timed_from_step": 10}))
    run_script.summarize("arith-mix", tmp_path / "arith-mix", {})
    summary = json.loads((tmp_path / "arith-mix" / "summary.json").read_text())
    assert summary["runs"][run.name]["timed_from_step"] == 10

    runs = {f"N2-s{seed}": {"passes": 2, "final": {"exact": 0.5}, "seconds": 600.0 * (seed + 1)} for seed in range(2)}
    runs["N2-s1"]["timed_from_step"] = 1400
    table, markdown = report.sleep_table(runs)
    assert table[2]["minutes"] == pytest.approx(10.0)  # the partly timed run is left out of the mean, and said so
    assert markdown.endswith("| 10.0 (1 of 2 timed) |")
    assert report.minutes(runs["N2-s1"]) == "20.0 (steps 1400+)" and report.minutes(runs["N2-s0"]) == "10.0"


def test_take_off_is_the_first_evaluation_at_or_above_the_threshold(tmp_path):
    exacts = {50: 0.2, 100: report.TAKE_OFF, 150: 0.4, 200: 0.9}
    records = [{"step": step, "kind": "eval", "exact": exact} for step, exact in exacts.items()]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert report.take_off_step(tmp_path) == 100
    (tmp_path / "metrics.jsonl").write_text(json.dumps(records[0]) + "\n")
    assert report.take_off_step(tmp_path) is None


def test_arithmetic_problems_are_read_back_from_their_tokens():
    one_op, two_ops = (
        "<pad> Q v3 ; v5 = 2 ; v7 = 1 ; v3 = v5 - v9 ; v9 = 4 ; A : 3",
        "Q v3 ; v6 = v5 + v5 ; v3 = v6 * v5 ; A : 4",
    )
    problem = arith_diagnosis.read_problem(one_op.split())
    assert problem == {"operator": "-", "operands": (2, 4), "constants": [2, 1, 4], "answer": 3}
    with pytest.raises(ValueError, match="not a one-operation problem"):
        arith_diagnosis.read_problem(two_ops.split())


def test_knowing_the_operator_and_the_operands_answers_every_generated_problem_and_the_operator_alone_does_not():
    config = ArithConfig(num_vars=16, modulus=5, min_ops=0, max_ops=1, windows=1, window=24)
    fit, score = arith_diagnosis.problems(config, "train", 4000), arith_diagnosis.problems(config, "eval", 600)
    assert 200 < len(score) < 400  # the one-operation half of a mixture with constant queries
    assert all(len(p["constants"]) == 3 for p in score)  # one window of 24 leaves room for one more constant
    full = arith_diagnosis.INFORMATION["operator and both operands' values"]
    assert arith_diagnosis.bayes_accuracy(fit, score, full)["accuracy"] == 1.0
    operator_only = arith_diagnosis.bayes_accuracy(fit, score, arith_diagnosis.INFORMATION["operator"])
    assert operator_only["accuracy"] < 0.35  # answers are uniform over Z_5; "*" leans to 0


def test_the_budget_counts_training_tokens_and_flops_and_scales_the_measured_time(tmp_path, capsys):
    """Tokens are steps x batch x example length and FLOPs steps x those of one batch (sleeplm.training.flops), so a
    preset with twice the passes costs more; the estimate is the run's hours times the preset's FLOPs over the run's."""
    experiment = build_experiment("depo-cpu", {"train.steps": "10", "train.batch_size": "4", "train.warmup_steps": "1"})
    batch = batched(make_source(experiment.task, "train", seed=0, size=4), 4, seed=0, shuffle=False)[0]
    counted = budget.training_compute(experiment)
    assert counted["tokens"] == 10 * 4 * experiment.task.sequence_length
    assert counted["flops"] == pytest.approx(10 * train_flops(experiment.config, batch))
    two_passes = build_experiment(
        "depo-cpu", {"train.steps": "10", "train.batch_size": "4", "train.warmup_steps": "1", "sleep.passes": "2"}
    )
    assert budget.training_compute(two_passes)["flops"] > counted["flops"]

    run = tmp_path / "run"
    run.mkdir()
    (run / "experiment.json").write_text(json.dumps(experiment.to_json()))
    (run / "time.json").write_text(json.dumps({"seconds": 7200.0}))
    budget.main([str(run), "depo-cpu", "--out", str(tmp_path / "budget.json")])
    report_ = json.loads((tmp_path / "budget.json").read_text())
    preset = budget.training_compute(build_experiment("depo-cpu", {}))
    assert report_["compute_ratio"] == pytest.approx(preset["flops"] / counted["flops"])
    assert report_["estimated_hours"] == pytest.approx(2 * report_["compute_ratio"])

    (run / "time.json").write_text(json.dumps({"seconds": 7200.0, "timed_from_step": 5}))
    with pytest.raises(SystemExit):
        budget.main([str(run), "depo-cpu"])
    assert "only timed from step 5" in capsys.readouterr().err
