"""Exclusive locks on files: one writer per run directory (`RunLock`), one builder per cache directory
(`waiting_lock`).

A lock is a file held with `fcntl.flock`. The kernel releases a flock when its holder exits in any way (SIGKILL,
a crash, the end of a preempted job), so on one host a held lock always has a live holder and a free one never
has. The file also holds a JSON record of its holder, `{"host", "pid", "started" (UTC, ISO 8601), "command"}`,
which is what a refused taker is told; the holder deletes the file when it releases the lock. A free lock whose
file still holds a record was left by a holder that died without releasing it (killed): it is stale, and the next
taker takes it over with a warning naming the old holder.

Limits. Across hosts on a shared filesystem the lock excludes a second host only where the filesystem shares
flocks between its clients (NFSv4, Lustre mounted with `flock`, GPFS, CephFS do; NFS mounted `nolock` and some
FUSE filesystems keep them local to each host, and there two hosts can both take it). Where flock is not supported
at all (it fails with ENOLCK or EOPNOTSUPP), the lock falls back to creating the file exclusively (O_EXCL): its
record is then the lock, a record of this host whose pid is no longer running is stale, and a record of another
host cannot be checked, so it is refused, saying to delete the file once that holder is gone.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import logging
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

logger = logging.getLogger(__name__)

UNSUPPORTED = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


class RunLockedError(ValueError):
    """The run directory is held by another live writer (named in the message: host, pid, since when)."""


def holder_record(command: str | None = None) -> dict:
    """This process as a lock's holder: host, pid, start time (UTC) and command line."""
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    command = " ".join(sys.argv) if command is None else command
    return {"host": socket.gethostname(), "pid": os.getpid(), "started": started, "command": command}


def describe(record: dict | None) -> str:
    """'pid P on host H since T (command C)', or what is known of it."""
    if not record:
        return "an unknown process (its lock file holds no record)"
    command = f" (`{record['command']}`)" if record.get("command") else ""
    return f"pid {record.get('pid')} on host {record.get('host')} since {record.get('started')}{command}"


def _parse(data: bytes) -> dict | None:
    try:
        record = json.loads(data.decode("utf-8"))
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


def read_record(path: Path, patience: float = 0.5) -> dict | None:
    """The record in a lock file (None when there is none). A holder writes its record just after taking the
    lock, so an empty or partial one is read again for up to `patience` seconds."""
    deadline = time.monotonic() + patience
    while True:
        try:
            record = _parse(Path(path).read_bytes())
        except FileNotFoundError:
            return None
        if record is not None or time.monotonic() >= deadline:
            return record
        time.sleep(0.02)


def is_alive(pid: int) -> bool:
    """Whether a process of this pid runs on this host."""
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _flocked(path: Path, blocking: bool) -> int | None:
    """An open descriptor of `path` (created when missing) holding its exclusive flock, or None when another
    holds it and not `blocking`. A file the holder deleted while this one waited is opened anew (so that two takers
    can never hold locks on two different files of one name). OSError when the filesystem has no flock."""
    while True:
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(descriptor)
            return None
        except BaseException:
            os.close(descriptor)
            raise
        try:
            same = os.stat(path).st_ino == os.fstat(descriptor).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return descriptor
        os.close(descriptor)


def _read_descriptor(descriptor: int) -> bytes:
    chunks = []
    while chunk := os.pread(descriptor, 1 << 16, sum(len(c) for c in chunks)):
        chunks.append(chunk)
    return b"".join(chunks)


def _write_record(descriptor: int, record: dict) -> None:
    data = json.dumps(record).encode() + b"\n"
    os.ftruncate(descriptor, 0)
    os.pwrite(descriptor, data, 0)
    os.fsync(descriptor)


class RunLock:
    """The one-writer lock of a run directory, held from `acquire()` (or entering the `with` block) to `release()`
    (or leaving it, also on an exception). A second taker while the holder lives gets `RunLockedError` at once,
    naming the holder; a lock left by a killed holder is taken over with a warning naming it."""

    def __init__(self, path: Path, command: str | None = None) -> None:
        self.path = Path(path).absolute()
        self.command = command
        self.record: dict | None = None
        self._descriptor: int | None = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    @property
    def held(self) -> bool:
        return self._descriptor is not None

    def _refuse(self, holder: dict | None, fallback: str = "") -> RunLockedError:
        return RunLockedError(
            f"{self.path.parent} is in use by another writer: {describe(holder)} holds {self.path}{fallback}. Wait "
            "for it to end or stop it: two writers in one run directory would overwrite each other's checkpoints"
        )

    def acquire(self) -> RunLock:
        if self.held:
            raise RuntimeError(f"{self.path} is already held by this RunLock")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        record = holder_record(self.command)
        try:
            descriptor = _flocked(self.path, blocking=False)
        except OSError as error:
            if error.errno not in UNSUPPORTED:
                raise
            return self._acquire_exclusive(record)
        if descriptor is None:
            raise self._refuse(read_record(self.path))
        try:
            previous = _parse(_read_descriptor(descriptor))
            if previous is not None:
                logger.warning(
                    f"taking over the stale lock {self.path} of {describe(previous)}: that process is no longer "
                    "running (it was killed or crashed without releasing the lock)"
                )
            _write_record(descriptor, record)
        except BaseException:
            os.close(descriptor)
            raise
        self._descriptor, self.record = descriptor, record
        return self

    def _acquire_exclusive(self, record: dict) -> RunLock:
        """The fallback where the filesystem has no flock: the lock is the file, created with O_EXCL."""
        for _ in range(100):
            try:
                descriptor = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                holder = read_record(self.path)
                same_host = holder is not None and holder.get("host") == record["host"]
                if same_host and not is_alive(holder.get("pid", -1)):
                    logger.warning(
                        f"taking over the stale lock {self.path} of {describe(holder)}: that process is no "
                        "longer running"
                    )
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(self.path)
                    continue
                unknown = "; its host cannot be asked whether it still runs: once it has ended, delete the file"
                raise self._refuse(holder, "" if same_host else unknown) from None
            _write_record(descriptor, record)
            self._descriptor, self.record = descriptor, record
            return self
        raise RunLockedError(f"could not take {self.path}: other processes keep taking it")

    def release(self) -> None:
        """Deletes the lock file and releases the lock (nothing when it is not held)."""
        if self._descriptor is None:
            return
        descriptor, self._descriptor = self._descriptor, None
        try:
            with contextlib.suppress(FileNotFoundError):
                if os.stat(self.path).st_ino == os.fstat(descriptor).st_ino:
                    os.unlink(self.path)
        finally:
            os.close(descriptor)

    def check_free(self) -> None:
        """RunLockedError naming the holder when a live writer holds the lock now (e.g. before deleting the run
        directory); nothing otherwise. It takes nothing: the lock file, stale or not, is left as it is."""
        try:
            descriptor = os.open(self.path, os.O_RDWR)
        except FileNotFoundError:
            return
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise self._refuse(read_record(self.path)) from None
        except OSError as error:
            if error.errno not in UNSUPPORTED:
                raise
            holder = read_record(self.path)
            if holder and not (holder.get("host") == socket.gethostname() and not is_alive(holder.get("pid", -1))):
                raise self._refuse(holder) from None
        finally:
            os.close(descriptor)


@contextlib.contextmanager
def waiting_lock(path: Path, what: str, poll: float = 0.1, report_every: float = 300.0) -> Iterator[None]:
    """Holds the exclusive lock `path` for the block, waiting for as long as another process holds it (e.g. while
    it builds the same cache): the wait is logged when it begins, naming the holder and `what` it does, and every
    `report_every` seconds after. The lock file is deleted on release. Where the filesystem has no flock, the
    block runs unlocked (with a warning)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    started, reported = time.monotonic(), None
    while True:
        try:
            descriptor = _flocked(path, blocking=False)
        except OSError as error:
            if error.errno not in UNSUPPORTED:
                raise
            logger.warning(f"{path.parent} does not support file locks: {what} runs without one")
            yield
            return
        if descriptor is not None:
            break
        now = time.monotonic()
        if reported is None or now - reported >= report_every:
            waited = f" (waited {now - started:.0f} s)" if reported is not None else ""
            logger.info(f"waiting for {describe(read_record(path))}, which holds {path}: {what}{waited}")
            reported = now
        time.sleep(poll)
    try:
        _write_record(descriptor, holder_record())
        yield
    finally:
        try:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        finally:
            os.close(descriptor)
