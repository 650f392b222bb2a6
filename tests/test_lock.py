"""One writer per run directory (`sleeplm.experiment.lock.RunLock`, `Workdir.writer_lock`): a second taker while a
live process holds the lock is refused at once, naming the holder; a lock left by a SIGKILLed process is taken over
with a warning naming it; the lock is released on exit and on an exception; where the filesystem has no flock, the
O_EXCL fallback tells stale from live holders by pid on this host and refuses another host's.

The holders are real processes (`python -c`) that load lock.py by its path (it imports only the standard library),
so each starts in a fraction of a second instead of importing JAX."""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sleeplm.experiment import lock as lock_module
from sleeplm.experiment.files import WRITER_LOCK
from sleeplm.experiment.lock import RunLock, RunLockedError
from sleeplm.experiment.workdir import Workdir

LOAD = f"""
import importlib.util, logging, sys, time
spec = importlib.util.spec_from_file_location("lock", {str(Path(lock_module.__file__))!r})
lock = importlib.util.module_from_spec(spec)
spec.loader.exec_module(lock)
logging.basicConfig()
"""
HOLD = (
    LOAD
    + """
held = lock.RunLock(sys.argv[1], command="the first train").acquire()
print("held", flush=True)
time.sleep(120)
"""
)
TRY = (
    LOAD
    + """
try:
    lock.RunLock(sys.argv[1]).acquire()
except lock.RunLockedError as error:
    print(error)
    sys.exit(3)
print("taken")
"""
)


def holder(path: Path) -> subprocess.Popen:
    """A process that takes the lock at `path` and sleeps, once it has said it holds it."""
    process = subprocess.Popen([sys.executable, "-c", HOLD, str(path)], stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "held"
    return process


def test_a_second_writer_is_refused_at_once_naming_the_live_holder(tmp_path):
    path = Workdir(tmp_path / "run").lock_path
    first = holder(path)
    try:
        started = time.monotonic()
        second = subprocess.run([sys.executable, "-c", TRY, str(path)], capture_output=True, text=True, timeout=60)
        assert second.returncode == 3, second.stdout + second.stderr
        for fact in (f"pid {first.pid}", f"on host {socket.gethostname()}", "since 20", "the first train"):
            assert fact in second.stdout
        assert time.monotonic() - started < 30  # refused at once, not after waiting for the holder
        refused = pytest.raises(RunLockedError, match=rf"run is in use by another writer: pid {first.pid} on host ")
        with refused, Workdir(tmp_path / "run").writer_lock():
            pass
        with pytest.raises(RunLockedError, match=rf"pid {first.pid}"):
            RunLock(path).check_free()
        assert json.loads(path.read_text())["pid"] == first.pid  # the refused takers left the holder's record
    finally:
        first.kill()
        first.wait()


def test_a_lock_left_by_a_killed_process_is_taken_over_with_a_warning(tmp_path, caplog):
    path = tmp_path / "run" / WRITER_LOCK
    first = holder(path)
    first.send_signal(signal.SIGKILL)
    first.wait()
    assert json.loads(path.read_text())["pid"] == first.pid  # killed: its record is left behind
    RunLock(path).check_free()  # no live holder; the check takes nothing
    assert json.loads(path.read_text())["pid"] == first.pid
    warnings = caplog.at_level(logging.WARNING, logger="sleeplm.experiment.lock")
    with warnings, Workdir(tmp_path / "run").writer_lock(command="the second train") as taken:
        record = json.loads(path.read_text())
        assert record["pid"] == os.getpid() and record["command"] == "the second train" and taken.held
    [warning] = [r.getMessage() for r in caplog.records]
    assert f"taking over the stale lock {path} of pid {first.pid} on host {socket.gethostname()}" in warning
    assert not path.exists()  # released on leaving the block
    second = subprocess.run([sys.executable, "-c", TRY, str(path)], capture_output=True, text=True, timeout=60)
    assert second.stdout.strip() == "taken" and "stale" not in second.stderr  # a clean release leaves no record


def test_the_lock_is_released_on_an_exception_and_only_process_zero_takes_it(tmp_path, caplog):
    workdir = Workdir(tmp_path / "run")
    with pytest.raises(KeyError), workdir.writer_lock():
        assert workdir.lock_path.is_file()
        raise KeyError("boom")
    assert not workdir.lock_path.exists()
    again = pytest.raises(RunLockedError, match=rf"pid {os.getpid()}")  # a second take in the same process too
    with caplog.at_level(logging.WARNING, logger="sleeplm.experiment.lock"), workdir.writer_lock(), again:
        RunLock(workdir.lock_path).acquire()
    assert not caplog.records
    with workdir.writer_lock(enabled=False):  # every process of a multi-process run but process 0
        assert not workdir.lock_path.exists()


def test_without_flock_the_exclusive_file_tells_stale_from_live_holders(tmp_path, monkeypatch, caplog):
    def no_flock(*args):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(lock_module.fcntl, "flock", no_flock)
    path = tmp_path / WRITER_LOCK
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    here, since = socket.gethostname(), "2026-01-01T00:00:00+00:00"
    records = {
        "live": {"host": here, "pid": os.getppid(), "started": since},
        "other host": {"host": "elsewhere", "pid": 1, "started": since},
    }
    for name, record in records.items():
        path.write_text(json.dumps(record))
        holder_named = re.escape(f"pid {record['pid']} on host {record['host']} since {since}")
        with pytest.raises(RunLockedError, match=holder_named):
            RunLock(path).acquire()
        if name == "other host":
            with pytest.raises(RunLockedError, match="its host cannot be asked whether it still runs"):
                RunLock(path).acquire()
    path.write_text(json.dumps({"host": here, "pid": int(dead.stdout), "started": since}))
    with caplog.at_level(logging.WARNING, logger="sleeplm.experiment.lock"), RunLock(path):
        assert json.loads(path.read_text())["pid"] == os.getpid()
        with pytest.raises(RunLockedError, match=rf"pid {os.getpid()}"):
            RunLock(path).acquire()
    assert f"taking over the stale lock {path} of pid {int(dead.stdout)}" in caplog.records[0].getMessage()
    assert not path.exists()


def test_train_and_a_fresh_start_refuse_a_run_another_process_trains(tmp_path):
    """Through `sleeplm train`: the run's writer lock is held by another live process, so `train` (and `train
    --fresh`, which would delete the run's files) fail at once naming its pid, before anything is written."""
    from sleeplm.cli.main import main as cli_main

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)  # as a run in progress has
    process = holder(Workdir(run).lock_path)
    try:
        for extra in ([], ["--fresh"]):
            with pytest.raises(SystemExit, match=rf"in use by another writer: pid {process.pid} on host"):
                cli_main(["train", "--preset", "rule110-cpu", "--workdir", str(run), *extra])
            assert sorted(p.name for p in run.iterdir()) == ["checkpoints", WRITER_LOCK]
    finally:
        process.kill()
        process.wait()
