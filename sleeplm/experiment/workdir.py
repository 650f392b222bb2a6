"""A run directory and what training and inference share about it."""

from __future__ import annotations


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: corrupted, or written for a different experiment."""


def differences(saved: dict, current: dict, prefix: str = "") -> list[str]:
    """ "field: saved X, now Y" for every leaf that differs between two nested dicts (e.g. experiment records)."""
    if isinstance(saved, dict) and isinstance(current, dict):
        keys = sorted(set(saved) | set(current))
        return [d for k in keys for d in differences(saved.get(k), current.get(k), f"{prefix}{k}.")]
    return [] if saved == current else [f"{prefix[:-1]}: saved {saved!r}, now {current!r}"]
