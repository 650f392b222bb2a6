"""The command line entry point (argument handling; training through the CLI is in test_loop.py)."""

from __future__ import annotations

import pytest

from sleeplm.cli.main import main
from sleeplm.training.presets import PRESETS


def test_unknown_command_names_the_choices(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["bogus"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'bogus'" in capsys.readouterr().err


def test_presets_lists_every_preset(capsys):
    main(["presets"])
    out = capsys.readouterr().out
    assert all(name in out for name in PRESETS)


def test_stray_arguments_to_eval_are_rejected():
    with pytest.raises(SystemExit, match=r"unrecognized arguments: --sleep.passes 2"):
        main(["eval", "--workdir", "x", "--sleep.passes", "2"])


def test_stream_demo_reproduces_forward():
    from sleeplm.cli.stream_demo import run_demo
    from sleeplm.config import Config, ModelConfig, SleepConfig

    tiny = Config(ModelConfig(vocab_size=16, d_model=16, layers=("attn", "gdn"), num_heads=2), SleepConfig(window=4))
    rows = run_demo(tiny, passes=(2,), windows=3, batch=2)
    assert rows[0]["passes"] == 2 and rows[0]["stream_vs_forward_rel_error"] < 1e-4
    assert all(rows[0][key] > 0 for key in ("wake_token_s", "wake_window_s", "sleep_s"))
