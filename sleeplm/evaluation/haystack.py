"""A prompt of an exact token length: an instruction, filler repeated around needles placed at depths, a question.

Every piece is encoded once with the run's codec and the prompt is their ids concatenated; the filler's ids are
tiled, never re-encoded, so a prompt of a million tokens costs one `np.tile`. A needle sits at the filler sentence
boundary nearest its depth (the haystack's end counts as one), so it never splits a word; needles at the same
boundary follow each other in the order given.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from sleeplm.data.task import Codec

# The landmark-attention passkey filler, which is also RULER's "noise" haystack; a trailing space joins repeats.
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "


@dataclasses.dataclass(frozen=True)
class Needle:
    """A needle as placed: its text, the token position of its first token in the prompt, and its depth (percent
    of the haystack's filler before it)."""

    text: str
    position: int
    depth: float


def encoded(codec: Codec, text: str) -> np.ndarray:
    return np.asarray(codec.encode(text), np.int32).reshape(-1)


def build_prompt(
    codec: Codec, length: int, instruction: str, needles: Sequence[tuple[str, float]], question: str
) -> tuple[np.ndarray, tuple[Needle, ...]]:
    """The prompt's ids, exactly `length` of them, and the needles as placed. `needles`: (text, depth percent)."""
    head, tail = encoded(codec, instruction), encoded(codec, question)
    pieces = [encoded(codec, text) for text, _ in needles]
    fixed = len(head) + len(tail) + sum(len(piece) for piece in pieces)
    filler_length = length - fixed
    if filler_length < 0:
        raise ValueError(f"length {length} is too short: the prompt without filler takes {fixed} tokens")
    unit = encoded(codec, FILLER)
    filler = np.tile(unit, -(-filler_length // len(unit)))[:filler_length]
    boundaries = np.append(np.arange(0, filler_length + 1, len(unit)), filler_length)
    cuts = [int(boundaries[np.argmin(np.abs(boundaries - depth / 100 * filler_length))]) for _, depth in needles]
    order = sorted(range(len(needles)), key=lambda i: (cuts[i], i))
    parts, placed, start, position = [head], [None] * len(needles), 0, len(head)
    for i in order:
        parts += [filler[start : cuts[i]], pieces[i]]
        position += cuts[i] - start
        depth = 100 * cuts[i] / filler_length if filler_length else 0.0
        placed[i] = Needle(needles[i][0], position, depth)
        position, start = position + len(pieces[i]), cuts[i]
    parts += [filler[start:], tail]
    return np.concatenate(parts), tuple(placed)
