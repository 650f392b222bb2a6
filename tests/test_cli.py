"""The command line entry point (argument handling; training through the CLI is in test_loop.py)."""

from __future__ import annotations

import pytest

from sleeplm.cli import main
from sleeplm.presets import PRESETS


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
