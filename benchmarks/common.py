"""Benchmark helpers: a record of where a number came from (timing is `sleeplm.cli.timing.median_seconds`)."""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import jax


@functools.cache
def provenance() -> dict:
    """The command, commit and machine a measurement was taken with, read once: at the start of the run, by
    `common`'s import, so a commit made while a long run goes on is not recorded as the one it ran."""
    commit = os.environ.get("SLEEPLM_COMMIT")  # set where the tree was copied without .git (the GPU machine)
    try:
        if commit:
            raise OSError("commit given by SLEEPLM_COMMIT")
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout
        dirty = subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True, check=True).stdout
        commit = commit.strip() + ("+uncommitted" if dirty.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        commit = commit or "unknown"
    device = jax.devices()[0]
    return {
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "commit": commit,
        "machine": f"{platform.machine()} {platform.processor() or ''} {os.cpu_count()} cpus".strip(),
        "device": f"{device.platform}:{device.device_kind}",
        "jax": jax.__version__,
    }


def write_record(args: argparse.Namespace, results: object, **extra: object) -> None:
    """Writes {config, provenance, results, ...} as JSON to args.out, if given."""
    if not args.out:
        return
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    record = {"config": vars(args) | {"out": str(out)}, "provenance": provenance(), "results": results, **extra}
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {out}")


provenance()  # at import: the tree the benchmark starts from
