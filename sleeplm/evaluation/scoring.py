"""RULER's scoring, written from its definition: an answer counts when it occurs in the output, compared
case-insensitively. "all" (RULER's string_match_all: niah_* and variable tracking) scores the fraction of the
answers found; "part" (string_match_part: its QA tasks) scores 1 when any is found. A cell's accuracy is the mean
over its examples, as a fraction (RULER prints it times 100)."""

from __future__ import annotations

from collections.abc import Sequence


def found(output: str, answers: Sequence[str]) -> list[bool]:
    text = output.lower()
    return [answer.lower() in text for answer in answers]


def match_all(output: str, answers: Sequence[str]) -> float:
    hits = found(output, answers)
    return sum(hits) / len(hits)


def match_part(output: str, answers: Sequence[str]) -> float:
    return float(any(found(output, answers)))


METRICS = {"all": match_all, "part": match_part}
