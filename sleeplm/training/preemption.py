"""Stopping a run cleanly on SIGTERM or SIGINT: the handler only sets a flag; the training loop reads it between
steps (a Python bool, no host sync), finishes the step, checkpoints it and raises `Preempted`, which `sleeplm
train` turns into exit code 75 (`sleeplm.cli.main.EXIT_PREEMPTED`).

On several processes (`jax.distributed`) every host must stop at the same step, or the checkpoint's collective save
hangs. SIGTERM is then left to the distributed runtime's preemption notifier (installed by
`jax.distributed.initialize`), and `jax.experimental.multihost_utils.reached_preemption_sync_point(step)`, called
every step on every host, is true on all of them at the same step (it only contacts the coordinator once a notice
came). SIGINT sets the local flag, and the hosts agree on it with one small all-gather at the steps `agree` names
(the loop passes its flush steps, every `run.log_every`), not at every step.
"""

from __future__ import annotations

import signal
import threading

import jax
import numpy as np


class Preempted(Exception):
    """The run stopped on a signal after checkpointing step `step`; training again in the workdir resumes it."""

    def __init__(self, step: int, signal_name: str, directory) -> None:
        super().__init__(
            f"stopped by {signal_name} after step {step}, checkpointed in {directory}/{step}: run the same `sleeplm "
            "train` command again to resume"
        )
        self.step, self.signal_name = step, signal_name


def _multi_process() -> bool:
    from jax._src import distributed

    return jax.process_count() > 1 and distributed.global_state.preemption_sync_manager is not None


class PreemptionGuard:
    """A context manager: while it is active, SIGTERM and SIGINT set `requested` (a second one of either acts as
    the handler before it would, e.g. SIGINT's KeyboardInterrupt: stop at once, without a checkpoint); on exit the
    previous handlers are back. Outside the main thread (where Python cannot set handlers) it installs nothing."""

    def __init__(self) -> None:
        self.requested: str | None = None  # the name of the signal that asked to stop
        self.multi_process = _multi_process()
        self._previous: dict[int, object] = {}

    def _handle(self, number, frame) -> None:
        if self.requested is not None:  # the second signal: what would have happened without us
            previous = self._previous.get(number)
            if callable(previous):
                previous(number, frame)
            elif previous == signal.SIG_DFL:
                signal.signal(number, signal.SIG_DFL)
                signal.raise_signal(number)
            return
        self.requested = signal.Signals(number).name

    def __enter__(self) -> PreemptionGuard:
        if threading.current_thread() is threading.main_thread():
            # On several processes the runtime's notifier owns SIGTERM (see the module docstring).
            numbers = (signal.SIGINT,) if self.multi_process else (signal.SIGTERM, signal.SIGINT)
            for number in numbers:
                self._previous[number] = signal.signal(number, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for number, previous in self._previous.items():
            signal.signal(number, previous)
        self._previous.clear()

    def should_stop(self, step: int, agree: bool) -> bool:
        """Whether to stop after `step`: the flag on one process; on several, the same answer on every host (call
        it at every step on all of them, with the same `agree`)."""
        if not self.multi_process:
            return self.requested is not None
        from jax.experimental import multihost_utils

        if multihost_utils.reached_preemption_sync_point(step):
            self.requested = self.requested or "SIGTERM"
            return True
        if agree:
            flags = multihost_utils.process_allgather(np.asarray(self.requested is not None))
            if np.any(flags):
                self.requested = self.requested or "SIGINT"
                return True
        return False
