"""`--SECTION.FIELD VALUE` overrides of an experiment: each value parsed by its field's type, each section's
fields changed together, bad names and values failing with a message naming them."""

from __future__ import annotations

import dataclasses
import typing
from typing import Any

from sleeplm.config import Derived
from sleeplm.experiment.schema import Experiment


def _convert(key: str, text: str, current: Any, annotation: Any) -> Any:
    """Parses `text` as the type of the field `key` (from its current value, else its annotation). "none" sets a
    field that may be None (a derived size is then derived again)."""
    optional = current is None or isinstance(current, Derived)
    kinds = [] if optional else [type(current)]
    kinds += [a for a in typing.get_args(annotation) if a is not type(None)] or [annotation]
    kind = kinds[0]
    if optional and text.lower() == "none":
        return None
    try:
        if kind is bool:
            if text.lower() not in ("true", "false", "1", "0"):
                raise ValueError
            return text.lower() in ("true", "1")
        if kind is tuple:
            return tuple(part.strip() for part in text.split(",") if part.strip())
        if kind in (int, float, str):
            return kind(text)
    except ValueError:
        raise ValueError(f"--{key} {text!r} is invalid: expected a value of type {kind.__name__}") from None
    raise ValueError(f"--{key} cannot be override_section from the command line (type {kind})")


SECTIONS = {
    "model": ("config", "model"),
    "sleep": ("config", "sleep"),
    "task": ("task",),
    "train": ("train",),
    "run": ("run",),
}


def override_experiment(experiment: Experiment, overrides: dict[str, str]) -> Experiment:
    """Applies {"sleep.passes": "4", ...}; unknown sections/fields and bad values raise ValueError naming them.

    Each section's fields change together (one validation per section), so e.g. train.steps and train.warmup_steps
    may be lowered in the same call. The result is not made consistent (`align_task_and_model`): a pretrained model
    keeps its own vocabulary."""
    by_section: dict[str, dict[str, str]] = {}
    for key, text in overrides.items():
        section, _, field = key.partition(".")
        if section not in SECTIONS or not field:
            raise ValueError(
                f"--{key} is invalid: overrides look like --SECTION.FIELD with SECTION in {sorted(SECTIONS)}"
            )
        if key == "task.window":
            raise ValueError("--task.window is not a setting: set --sleep.window, the task's window follows it")
        by_section.setdefault(section, {})[field] = text
    for section, changes in by_section.items():
        updated = override_section(_section(experiment, section), section, changes)
        path = SECTIONS[section]
        if len(path) == 2:
            updated = dataclasses.replace(experiment.config, **{path[1]: updated})
        experiment = dataclasses.replace(experiment, **{path[0]: updated})
    return experiment


def override_section(target: Any, section: str, changes: dict[str, str]) -> Any:
    """The config dataclass `target` of `section` with {field: text} parsed by each field's type and applied
    together; unknown fields and bad values raise ValueError naming --SECTION.FIELD."""
    fields = {f.name for f in dataclasses.fields(target)}
    parsed = {}
    for field, text in changes.items():
        key = f"{section}.{field}"
        if field not in fields:
            raise ValueError(f"--{key} is invalid: {section} has the fields {sorted(fields)}")
        hint = typing.get_type_hints(type(target))[field]
        parsed[field] = _convert(key, text, getattr(target, field), hint)
    return dataclasses.replace(target, **parsed)


def _section(experiment: Experiment, section: str):
    target = experiment
    for attribute in SECTIONS[section]:
        target = getattr(target, attribute)
    return target
