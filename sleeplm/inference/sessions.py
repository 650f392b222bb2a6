"""Where a served session's stream lives when it is not in a decode slot: host memory, most recently used first,
and files on disk. A session is its batch-1 `Stream` (sleep state, next-token logits, sampling key and count), so
its stored size is fixed by the model and the window and never grows with its history.

A session file is one `.npz` (the stream's arrays, and a JSON record of the config it belongs to and the tokens it
has consumed) written under a temporary name and renamed: a server killed at any moment leaves each session's
previous file or its new one, never part of either.
"""

from __future__ import annotations

import collections
import concurrent.futures
import io
import json
import logging
import re
import threading
from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np

from sleeplm.config import Config
from sleeplm.experiment.files import atomic_write
from sleeplm.experiment.workdir import CheckpointError, differences
from sleeplm.inference.streams import Stream, config_record

log = logging.getLogger(__name__)
SESSION_ID = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}")
SUFFIX = ".npz"


def check_session_id(session_id: object) -> str:
    """`session_id` if it is a valid name (it becomes a file name), else a ValueError saying what is allowed."""
    if not isinstance(session_id, str) or not SESSION_ID.fullmatch(session_id):
        raise ValueError(
            f"session id {session_id!r:.80} is invalid: use 1-128 letters, digits, '_', '-' or '.' (not first)"
        )
    return session_id


def row_bytes(row: Stream) -> int:
    """Bytes a stored session takes in memory (every array of its stream)."""
    return sum(np.asarray(leaf).nbytes for leaf in jax.tree.leaves(row))


def save_row(path: Path, row: Stream, config: Config) -> None:
    """Writes the batch-1 stream `row` of `config` to `path` atomically."""
    arrays = {f"leaf{i}": np.asarray(leaf) for i, leaf in enumerate(jax.tree.leaves(row))}
    record = {"config": config_record(config), "consumed": int(np.asarray(row.consumed)[0])}
    buffer = io.BytesIO()
    np.savez(buffer, record=np.asarray(json.dumps(record)), **arrays)
    atomic_write(path, buffer.getvalue())


def read_record(path: Path) -> dict:
    """A session file's record (its config and tokens consumed), without reading its arrays."""
    try:
        with np.load(path) as saved:
            return json.loads(str(saved["record"]))
    except Exception as error:
        raise CheckpointError(f"session file {path} is unreadable ({type(error).__name__}: {error})") from error


def load_row(path: Path, template: Stream, config: Config) -> Stream:
    """The batch-1 stream saved in `path`, shaped like `template`; fails naming the file and what differs when it
    was saved for another model or is damaged."""
    record = read_record(path)
    mismatch = differences(record["config"], config_record(config), "config.")
    if mismatch:
        raise CheckpointError(f"session file {path} was saved for another model: " + "; ".join(mismatch[:5]))
    leaves, treedef = jax.tree.flatten(template)
    with np.load(path) as saved:
        arrays = [saved[f"leaf{i}"] for i in range(len(leaves))]
    for i, (array, leaf) in enumerate(zip(arrays, leaves, strict=True)):
        if array.shape != leaf.shape or array.dtype != leaf.dtype:
            raise CheckpointError(
                f"session file {path}: array {i} is {array.dtype}{list(array.shape)}, "
                f"expected {leaf.dtype}{list(leaf.shape)}"
            )
    return jax.tree.unflatten(treedef, arrays)


class SessionStore:
    """Streams of sessions out of the slots: up to `host_sessions` in host memory (the least recently used leave
    first), the rest as files in `directory`. `durable`: the files are the server's state (`--state-dir`), kept
    and read back after a restart; otherwise the directory is scratch space.

    Every file operation runs on one writer thread, in the order asked, so a slow disk never stalls the engine
    and a later state of a session is never overwritten by an earlier one. Each stored state carries its
    session's version (the scheduler counts the requests a session has started), and a file is known to hold a
    session's latest state when its version is the session's current one.
    """

    def __init__(self, directory: Path, config: Config, template: Stream, host_sessions: int, durable: bool) -> None:
        if not isinstance(host_sessions, int) or host_sessions < 0:
            raise ValueError(f"host_sessions={host_sessions!r} is invalid: must be an integer >= 0")
        self.directory, self.config, self.template = Path(directory), config, template
        self.host_sessions, self.durable = host_sessions, durable
        self.directory.mkdir(parents=True, exist_ok=True)
        self.host: collections.OrderedDict[str, tuple[Stream, int]] = collections.OrderedDict()
        self._on_disk: dict[str, int] = {}  # session -> version its file holds
        self._lock = threading.Lock()
        self._writer = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="sleeplm-sessions")

    def path(self, session_id: str) -> Path:
        return self.directory / f"{session_id}{SUFFIX}"

    def saved_sessions(self) -> dict[str, int]:
        """Each session with a file in the directory (version 0), and the tokens it has consumed."""
        sessions = {}
        for path in sorted(self.directory.glob(f"*{SUFFIX}")):
            if SESSION_ID.fullmatch(path.stem):
                sessions[path.stem] = read_record(path)["consumed"]
                self._on_disk[path.stem] = 0
        return sessions

    def save(
        self, session_id: str, row: Stream, version: int, then: Callable[[Exception | None], None] | None = None
    ) -> None:
        """Writes `row` as the session's file on the writer thread, then calls `then` there with None, or with the
        error when the write failed (the previous file is left as it was)."""

        def write() -> None:
            try:
                save_row(self.path(session_id), row, self.config)
            except Exception as error:
                log.exception("could not write session %s to %s", session_id, self.path(session_id))
                if then is not None:
                    then(error)
                return
            with self._lock:
                self._on_disk[session_id] = version
            if then is not None:
                then(None)

        self._writer.submit(write)

    def put(self, session_id: str, row: Stream, version: int) -> None:
        """Keeps `row` in host memory as the session's latest state, moving the least recently used to disk."""
        self.host[session_id] = (row, version)
        self.host.move_to_end(session_id)
        while len(self.host) > self.host_sessions:
            oldest, (oldest_row, oldest_version) = self.host.popitem(last=False)
            with self._lock:
                current = self._on_disk.get(oldest) == oldest_version
            if not current:
                self.save(oldest, oldest_row, oldest_version)

    def take(self, session_id: str) -> Stream | None:
        """The session's stored stream (host first, then disk, after pending writes), or None when it has none."""
        if session_id in self.host:
            return self.host.pop(session_id)[0]
        self.flush()
        if not self.path(session_id).exists():
            return None
        row = load_row(self.path(session_id), self.template, self.config)
        if not self.durable:  # scratch: the slot holds the session now
            self.delete(session_id)
        return row

    def location(self, session_id: str) -> str | None:
        if session_id in self.host:
            return "host"
        with self._lock:
            return "disk" if session_id in self._on_disk else None

    def delete(self, session_id: str) -> None:
        self.host.pop(session_id, None)

        def unlink() -> None:
            self.path(session_id).unlink(missing_ok=True)
            with self._lock:
                self._on_disk.pop(session_id, None)

        self._writer.submit(unlink)

    def flush(self) -> None:
        """Waits for every file operation asked so far."""
        self._writer.submit(lambda: None).result()

    def close(self) -> None:
        self._writer.shutdown(wait=True)
