"""The `sleeplm` command line (`main.py`) and its tools: the demos, learning-curve plots and wall-clock timing."""

from sleeplm.cli.main import main

__all__ = ["main"]
