"""The run directory: `Workdir` owns every file name in it (each defined once, in `sleeplm/experiment/files.py`),
the one atomic-write helper keeps the old file when a write fails, a directory built atomically is all there or not
there, and a directory that is not a run fails naming the missing file."""

from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest

from sleeplm.experiment import files
from sleeplm.experiment.files import atomic_write, building
from sleeplm.experiment.workdir import NotARunError, Workdir

ROOT = Path(__file__).resolve().parent.parent
NAMES = ("experiment.json", "tokenizer.json", "corpus.json", "metrics.jsonl", "hf_config.json", "writer.lock")


def string_constants(path: Path) -> list[tuple[str, int]]:
    """(value, line) of every string constant of a source file that is not a docstring (nor any other bare string
    expression): names in comments and docstrings do not count, names in code and messages do."""
    tree = ast.parse(path.read_text(), filename=str(path))
    bare = {id(node.value) for node in ast.walk(tree) if isinstance(node, ast.Expr)}
    return [
        (node.value, node.lineno)
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in bare
    ]


def test_each_run_file_name_is_defined_once_in_the_files_module():
    sources = sorted((ROOT / "sleeplm").rglob("*.py")) + sorted((ROOT / "experiments").glob("*.py"))
    found: dict[str, list[str]] = {name: [] for name in (*NAMES, "checkpoints")}
    for path in sources:
        for value, line in string_constants(path):
            if value in found:
                found[value].append(f"{path.relative_to(ROOT)}:{line}")
    where = "sleeplm/experiment/files.py"
    for name, places in found.items():
        assert len(places) == 1 and places[0].startswith(where + ":"), f"{name!r} is written as a literal at {places}"
    names = (files.EXPERIMENT, files.TOKENIZER, files.CORPUS, files.METRICS, files.HF_CONFIG, files.WRITER_LOCK)
    assert names == NAMES and files.eval_name(3) == "eval_step3.json"
    run = Workdir(Path("/r"))
    paths = (run.experiment_path, run.tokenizer_path, run.corpus_path, run.metrics_path, run.hf_config_path)
    paths += (run.lock_path,)
    assert [p.name for p in paths] == list(NAMES) and run.eval_path(3) == Path("/r/eval_step3.json")


def test_the_literal_check_sees_code_and_messages_but_not_docstrings(tmp_path):
    source = tmp_path / "m.py"
    source.write_text('"""x.json"""\n\n\ndef f():\n    "y.json"\n    return "a.json", f"{1} b.json"\n')
    assert sorted(value for value, _ in string_constants(source)) == [" b.json", "a.json"]


def test_atomic_write_keeps_the_old_file_when_the_write_fails(tmp_path, monkeypatch):
    path = tmp_path / "experiment.json"
    atomic_write(path, "old\n")
    assert path.read_text() == "old\n"

    def failing_replace(source, target):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, "new\n")
    assert path.read_text() == "old\n" and sorted(p.name for p in tmp_path.iterdir()) == ["experiment.json"]
    monkeypatch.undo()

    def failing_fsync(descriptor):  # the data is written, not yet on disk
        raise OSError("i/o error")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="i/o error"):
        atomic_write(path, b"new bytes")
    assert path.read_text() == "old\n" and sorted(p.name for p in tmp_path.iterdir()) == ["experiment.json"]
    monkeypatch.undo()
    atomic_write(path, b"new bytes")
    assert path.read_bytes() == b"new bytes" and sorted(p.name for p in tmp_path.iterdir()) == ["experiment.json"]


def test_a_directory_built_atomically_is_all_there_or_not_there(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="midway"), building(out) as directory:
        (directory / "half").write_text("x")
        raise RuntimeError("midway")
    assert list(tmp_path.iterdir()) == []
    with building(out) as directory:
        (directory / "whole").write_text("x")
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and (out / "whole").read_text() == "x"
    with pytest.raises(ValueError, match=r"out exists: the output must be a new directory"), building(out):
        pass
    with building(out, keep_existing=True) as directory:  # another process built it first: its build stays
        (directory / "other").write_text("y")
    assert sorted(p.name for p in out.iterdir()) == ["whole"] and [p.name for p in tmp_path.iterdir()] == ["out"]


def test_a_directory_that_is_no_run_fails_naming_the_missing_file(tmp_path):
    run = Workdir(tmp_path / "run")
    assert not run.is_run()
    with pytest.raises(NotARunError, match=r"run/experiment.json does not exist: .* is not a sleeplm run directory"):
        run.check()
    with pytest.raises(NotARunError, match=r"run/experiment.json does not exist"):
        run.experiment()
    run.path.mkdir()
    atomic_write(run.experiment_path, "{}")
    with pytest.raises(NotARunError, match=r"run/checkpoints does not exist"):
        run.check()
    run.checkpoints_path.mkdir()
    assert run.is_run() and run.check() is run
