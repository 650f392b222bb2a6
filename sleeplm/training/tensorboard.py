"""TensorBoard event files beside metrics.jsonl (tensorboardX, no TensorFlow): train loss, grad norm, learning rates
and real tokens per second at every logged step, every eval metric at every evaluation. Only process 0 writes.

`TENSORBOARD` is the events' directory in a run directory (`tensorboard logdir RUN/tensorboard`). A resumed run
opens a new event file with `purge_step` = the restored step + 1, so a reader drops what an earlier invocation wrote
past the checkpoint it resumes from: every step appears once."""

from __future__ import annotations

import re
from pathlib import Path

import jax

TENSORBOARD = "tensorboard"  # the run directory's event files (not yet in experiment/files.py: edited concurrently)


def tag(prefix: str, name: str) -> str:
    """The event tag of metric `name`: "PREFIX/NAME" with each character TensorBoard does not allow in a tag made
    "_" (tensorboardX would do so itself), e.g. eval "loss@pos0-L" -> "eval/loss_pos0-L"."""
    return f"{prefix}/" + re.sub(r"[^-/\w.]", "_", name)


class EventLog:
    """Scalars to `workdir/tensorboard` (a no-op on processes other than 0)."""

    def __init__(self, workdir: Path, resume_step: int) -> None:
        self.writer = None
        if jax.process_index() != 0:
            return
        from tensorboardX import SummaryWriter

        purge = resume_step + 1 if resume_step > 0 else None
        self.writer = SummaryWriter(str(Path(workdir) / TENSORBOARD), purge_step=purge, flush_secs=30)

    @property
    def enabled(self) -> bool:
        return self.writer is not None

    def scalars(self, step: int, values: dict[str, float], prefix: str) -> None:
        if self.writer is None:
            return
        for name, value in values.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(tag(prefix, name), float(value), global_step=step)

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
