"""The command line entry point."""

from __future__ import annotations

import pytest

from sleeplm.__main__ import main


def test_unknown_command_names_the_choices():
    with pytest.raises(SystemExit, match=r"usage: python -m sleeplm \{demo\}.*got \['train'\]"):
        main(["train"])
