"""The names of a run directory's files and the one way the package writes a file or a directory atomically.

This module imports nothing from the package, so every layer (the text task's run files in `data/`, the run
directory in `experiment/workdir.py`, conversion in `hf/`) can name a run's files and write them from here.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

EXPERIMENT = "experiment.json"  # the experiment record (`Experiment.to_json`)
CHECKPOINTS = "checkpoints"  # orbax checkpoints, one directory per step
METRICS = "metrics.jsonl"  # one JSON record per logged train step or evaluation
TOKENIZER = "tokenizer.json"  # the text task's tokenizer (its run file; also a checkpoint's and a cache's)
CORPUS = "corpus.json"  # the text task's corpus manifest: which files, sizes and content digests, which tokenizer
HF_CONFIG = "hf_config.json"  # a converted workdir's copy of the checkpoint's config.json, which export writes back
WRITER_LOCK = "writer.lock"  # held by the one process writing the run (`lock.RunLock`): its host, pid, start time


def eval_name(step: int) -> str:
    """The file `sleeplm eval` writes its metrics of checkpoint `step` to."""
    return f"eval_step{int(step)}.json"


def atomic_write(path: Path, content: bytes | str) -> Path:
    """Writes `content` (text as UTF-8) to `path` through a temporary file in the same directory, flushed to disk,
    then renamed over `path`: a reader sees the old file or the new one, never part of either. A failure leaves
    the old file (if any) and no temporary file."""
    path = Path(path)
    data = content.encode("utf-8") if isinstance(content, str) else bytes(content)
    descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(descriptor, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
    return path


@contextlib.contextmanager
def building(final: Path, *, keep_existing: bool = False) -> Iterator[Path]:
    """A new temporary directory beside `final` to fill; when the block succeeds it is renamed to `final`, when it
    fails it is removed, so nothing half-written ever has the name `final`.

    `final` must not exist yet (ValueError naming it), unless `keep_existing`: then a `final` that exists when the
    block ends (another process finished the same build first) is kept and the temporary one dropped."""
    final = Path(final).absolute()
    if final.exists() and not keep_existing:
        raise ValueError(f"{final} exists: the output must be a new directory")
    final.parent.mkdir(parents=True, exist_ok=True)
    temporary = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".building", dir=final.parent))
    try:
        yield temporary
        try:
            os.rename(temporary, final)
        except OSError:
            if not (keep_existing and final.is_dir()):
                raise
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
