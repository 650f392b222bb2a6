"""Fault injection: a small training run killed again and again (SIGKILL and SIGTERM mixed, some kills aimed at
checkpoint writes) and resumed each time must end exactly where an uninterrupted run ends.

    python tests/fault_injection.py --kills 20 --seed 0 --out fault_injection.json

runs the uninterrupted reference, then the faulty run: each invocation of `sleeplm train` is killed after a random
delay once it is stepping, or, for about a third of the kills, as soon as a checkpoint directory is being written
(orbax's temporary directory appears); after every kill every checkpoint left must restore, and the run is started
again. When the kills are spent the run finishes undisturbed. Then the final parameters and every metrics record
(wall-clock fields aside) must equal the reference's bit for bit. Prints and writes a JSON summary; exits 1 on any
difference. `tests/test_fault_injection.py` runs it with a few kills (slow).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from test_loop import TINY

ROOT = Path(__file__).resolve().parents[1]

# test_loop's tiny Rule 110 run, longer: steps take milliseconds, and kills land in the middle of the run.
OVERRIDES = TINY | {
    "train.steps": "120",
    "train.warmup_steps": "4",
    "run.eval_every": "40",
    "run.checkpoint_every": "4",
    "run.keep_checkpoints": "3",
    "run.log_every": "1",
}
WALL_CLOCK = ("seconds", "timed_from_step")  # differ between runs by design


def command(workdir: Path) -> list[str]:
    overrides = [item for key, value in OVERRIDES.items() for item in (f"--{key}", value)]
    return [sys.executable, "-m", "sleeplm", "train", "--preset", "rule110-cpu", "--workdir", str(workdir), *overrides]


def start(workdir: Path) -> subprocess.Popen:
    return subprocess.Popen(command(workdir), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def logged_steps(workdir: Path) -> int:
    path = workdir / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def writing_checkpoint(workdir: Path) -> bool:
    """Whether orbax is writing a checkpoint now (its temporary directory exists)."""
    directory = workdir / "checkpoints"
    return directory.is_dir() and any(".orbax-checkpoint-tmp" in p.name for p in directory.iterdir())


def kill_once(workdir: Path, rng: random.Random) -> dict:
    """Starts the run, kills it (SIGKILL or SIGTERM) at a random moment or during a checkpoint write, and reports
    what happened. Returns {"signal", "aimed_at_write", "during_write", "exit_code", "finished"}."""
    process = start(workdir)
    before = logged_steps(workdir)
    sig = rng.choice([signal.SIGKILL, signal.SIGTERM])
    aimed = rng.random() < 1 / 3
    delay = rng.uniform(0.0, 1.5)
    stepping_since = None
    during_write = False
    while process.poll() is None:
        if stepping_since is None and logged_steps(workdir) > before:
            stepping_since = time.monotonic()
        if stepping_since is not None:
            writing = writing_checkpoint(workdir)
            if (aimed and writing) or (not aimed and time.monotonic() - stepping_since >= delay):
                during_write = writing
                process.send_signal(sig)
                break
        time.sleep(0.001)
    _, stderr = process.communicate(timeout=300)
    return {
        "signal": signal.Signals(sig).name,
        "aimed_at_write": aimed,
        "during_write": during_write or writing_checkpoint(workdir),
        "exit_code": process.returncode,
        "finished": process.returncode == 0,
        "stderr_tail": stderr.strip().splitlines()[-1:] if process.returncode not in (0, -9, -15) else [],
    }


def restore_every_checkpoint(workdir: Path) -> list[int]:
    """The steps of every checkpoint in `workdir`, each restored (fails loudly on an unreadable one)."""
    from sleeplm.experiment.workdir import Workdir

    run = Workdir(workdir)
    if not run.checkpoints_path.is_dir():
        return []
    steps = run.checkpoints().all_steps()
    for step in steps:
        run.restore_params(step=step)
    return steps


def final_params(workdir: Path) -> dict:
    import jax

    from sleeplm.experiment.workdir import Workdir

    params, step = Workdir(workdir).restore_params()
    leaves = jax.tree_util.tree_leaves_with_path(params)
    return {"step": step} | {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in leaves}


def records(workdir: Path) -> list[dict]:
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in WALL_CLOCK} for line in lines]


def run(kills: int, seed: int, directory: Path) -> dict:
    rng = random.Random(seed)
    reference, faulty = directory / "reference", directory / "faulty"
    done = subprocess.run(command(reference), cwd=ROOT, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"the reference run failed:\n{done.stderr[-2000:]}")
    events = []
    while len(events) < kills:
        event = kill_once(faulty, rng)
        event["checkpoints_after"] = restore_every_checkpoint(faulty)
        events.append(event)
        print(json.dumps({k: v for k, v in event.items() if k != "stderr_tail"}), flush=True)
        if event["finished"]:  # the run ended before the kill: start the next one from scratch
            break
    finish = subprocess.run(command(faulty), cwd=ROOT, capture_output=True, text=True)
    if finish.returncode:
        raise SystemExit(f"the resumed run failed:\n{finish.stderr[-2000:]}")
    ours, theirs = final_params(faulty), final_params(reference)
    differing = sorted(name for name in theirs if not np.array_equal(ours.get(name), theirs[name]))
    same_records = records(faulty) == records(reference)
    return {
        "kills": len(events),
        "sigkill": sum(e["signal"] == "SIGKILL" for e in events),
        "sigterm": sum(e["signal"] == "SIGTERM" for e in events),
        "during_checkpoint_write": sum(e["during_write"] for e in events),
        "exit_codes": sorted({e["exit_code"] for e in events}),
        "params_bit_exact": not differing,
        "differing_params": differing[:10],
        "metrics_records_equal": same_records,
        "final_step": int(ours["step"]),
        "events": events,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dir", type=Path, default=None, help="where the two runs go (default: a temporary one)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as temporary:
        directory = args.dir or Path(temporary)
        directory.mkdir(parents=True, exist_ok=True)
        summary = {"command": " ".join(command(Path("WORKDIR"))), "seed": args.seed} | run(
            args.kills, args.seed, directory
        )
    text = json.dumps({k: v for k, v in summary.items() if k != "events"}, indent=2)
    print(text)
    if args.out:
        args.out.write_text(json.dumps(summary, indent=2) + "\n")
    if not (summary["params_bit_exact"] and summary["metrics_records_equal"]):
        raise SystemExit(1)


if __name__ == "__main__":
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    main()
