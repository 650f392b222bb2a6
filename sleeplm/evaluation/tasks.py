"""The suite's tasks, each a generator deterministic from (seed, task, sample): passkey retrieval in the
landmark-attention format, RULER's needle-in-a-haystack family on its "noise" haystack (`niah_single`,
`niah_multikey`, `niah_multivalue`, `niah_multiquery`) and variable tracking (`vt`).

An example's keys and values depend on neither the context length nor the depth, so across the depth-by-length
map a sample changes only where its needles sit and how much filler surrounds them. The queried needles sit at the
requested depth (one after another when there are several); the distractor needles of `niah_multikey` at random
depths (the same for a sample at every depth); a `vt` chain starts at the requested depth and its hops are spread
evenly from there to the end of the haystack. Keys are adjective-noun pairs (RULER draws words too), values 7-digit
numbers, the passkey a 5-digit one, `vt`'s variables five capital letters.
"""

from __future__ import annotations

import dataclasses
import itertools
import zlib
from collections.abc import Callable

import numpy as np

from sleeplm.data.task import Codec
from sleeplm.evaluation.haystack import Needle, build_prompt

ADJECTIVES = (
    "amber", "bitter", "brave", "calm", "clever", "crimson", "dusty", "eager", "fancy", "fearless", "gentle",
    "golden", "hollow", "humble", "icy", "jolly", "lively", "lucky", "misty", "noble", "olive", "polite", "quiet",
    "rapid", "rustic", "silent", "silver", "tidy", "vivid", "witty",
)  # fmt: skip
NOUNS = (
    "anchor", "badger", "barrel", "beacon", "canyon", "castle", "comet", "crib", "falcon", "fiddle", "garden",
    "harbor", "island", "kettle", "lantern", "meadow", "mirror", "orchard", "parrot", "pebble", "pillow", "quarry",
    "ribbon", "saddle", "spruce", "teapot", "thimble", "tunnel", "velvet", "walrus",
)  # fmt: skip

NIAH_INSTRUCTION = (
    "Some special magic numbers are hidden within the following text. Make sure to memorize it. "
    "I will quiz you about the numbers afterwards.\n"
)
NEEDLES_PER_TASK = 4  # RULER's defaults: 4 keys for multikey and multiquery, 4 values for multivalue
VT_HOPS = 4  # RULER's default: one chain of 4 hops, so 5 variables hold the value


@dataclasses.dataclass(frozen=True)
class Spec:
    """An example before it is laid out: instruction, needles (text, depth percent), question, answers."""

    instruction: str
    needles: list[tuple[str, float]]
    question: str
    answers: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class SuiteTask:
    """A task: its generator `spec(rng, depth)`, its RULER metric ("all" or "part") and the tokens generated."""

    spec: Callable[[np.random.Generator, float], Spec]
    metric: str
    max_new_tokens: int


@dataclasses.dataclass(frozen=True)
class Example:
    """A prompt of `length` tokens (`ids`), its needles as placed and the answers the output must contain."""

    task: str
    length: int
    depth: float
    sample: int
    ids: np.ndarray
    needles: tuple[Needle, ...]
    answers: tuple[str, ...]

    def record(self) -> dict:
        """The example as JSON (without its ids)."""
        needles = [dataclasses.asdict(needle) for needle in self.needles]
        fields = ("task", "length", "depth", "sample")
        return {f: getattr(self, f) for f in fields} | {"needles": needles, "answers": list(self.answers)}


def keys(rng: np.random.Generator, count: int) -> list[str]:
    """`count` distinct adjective-noun keys."""
    chosen = rng.choice(len(ADJECTIVES) * len(NOUNS), count, replace=False)
    return [f"{ADJECTIVES[i // len(NOUNS)]}-{NOUNS[i % len(NOUNS)]}" for i in chosen]


def numbers(rng: np.random.Generator, count: int, digits: int = 7) -> list[str]:
    """`count` distinct numbers of `digits` digits."""
    chosen = rng.choice(9 * 10 ** (digits - 1), count, replace=False) + 10 ** (digits - 1)
    return [str(int(n)) for n in chosen]


def magic(key: str, value: str) -> str:
    return f"One of the special magic numbers for {key} is: {value}. "


def ask_one(key: str) -> str:
    return (
        f"\nWhat is the special magic number for {key} mentioned in the provided text? "
        f"The special magic number for {key} mentioned in the provided text is"
    )


def ask_all(query: str) -> str:
    return (
        f"\nWhat are all the special magic numbers for {query} mentioned in the provided text? "
        f"The special magic numbers for {query} mentioned in the provided text are"
    )


def passkey(rng: np.random.Generator, depth: float) -> Spec:
    key = str(int(rng.integers(10_000, 100_000)))
    instruction = (
        "There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
        "I will quiz you about the important information there.\n"
    )
    needle = f"\nThe pass key is {key}. Remember it. {key} is the pass key.\n"
    return Spec(instruction, [(needle, depth)], "\nWhat is the pass key? The pass key is", (key,))


def niah_single(rng: np.random.Generator, depth: float) -> Spec:
    (key,), (value,) = keys(rng, 1), numbers(rng, 1)
    return Spec(NIAH_INSTRUCTION, [(magic(key, value), depth)], ask_one(key), (value,))


def niah_multikey(rng: np.random.Generator, depth: float) -> Spec:
    names, values = keys(rng, NEEDLES_PER_TASK), numbers(rng, NEEDLES_PER_TASK)
    others = rng.uniform(0, 100, NEEDLES_PER_TASK - 1)
    needles = [(magic(names[0], values[0]), depth)]
    needles += [(magic(k, v), float(d)) for k, v, d in zip(names[1:], values[1:], others, strict=True)]
    return Spec(NIAH_INSTRUCTION, needles, ask_one(names[0]), (values[0],))


def niah_multivalue(rng: np.random.Generator, depth: float) -> Spec:
    (key,), values = keys(rng, 1), numbers(rng, NEEDLES_PER_TASK)
    return Spec(NIAH_INSTRUCTION, [(magic(key, v), depth) for v in values], ask_all(key), tuple(values))


def niah_multiquery(rng: np.random.Generator, depth: float) -> Spec:
    names, values = keys(rng, NEEDLES_PER_TASK), numbers(rng, NEEDLES_PER_TASK)
    needles = [(magic(k, v), depth) for k, v in zip(names, values, strict=True)]
    query = ", ".join(names[:-1]) + ", and " + names[-1]
    return Spec(NIAH_INSTRUCTION, needles, ask_all(query), tuple(values))


def vt(rng: np.random.Generator, depth: float) -> Spec:
    letters = rng.choice(26, (64, 5))
    names = list(dict.fromkeys("".join(chr(65 + int(c)) for c in row) for row in letters))[: VT_HOPS + 1]
    value = numbers(rng, 1, digits=5)[0]
    statements = [f"VAR {names[0]} = {value}. "]
    statements += [f"VAR {b} = VAR {a}. " for a, b in itertools.pairwise(names)]
    depths = np.linspace(depth, 100, len(statements))
    instruction = "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
    question = (
        f"\nQuestion: Find all variables that are assigned the value {value} in the text above. Answer: According "
        f"to the chain(s) of variable assignment in the text above, {len(names)} variables are assigned the value "
        f"{value}, they are:"
    )
    return Spec(instruction, [(s, float(d)) for s, d in zip(statements, depths, strict=True)], question, tuple(names))


# RULER's metrics (string_match_all for niah_* and variable tracking) and its tokens to generate (128 for niah, 30
# for variable tracking); the passkey is one 5-digit number.
TASKS = {
    "passkey": SuiteTask(passkey, "all", 16),
    "niah_single": SuiteTask(niah_single, "all", 128),
    "niah_multikey": SuiteTask(niah_multikey, "all", 128),
    "niah_multivalue": SuiteTask(niah_multivalue, "all", 128),
    "niah_multiquery": SuiteTask(niah_multiquery, "all", 128),
    "vt": SuiteTask(vt, "all", 30),
}


def make_example(task: str, codec: Codec, length: int, depth: float, sample: int, seed: int) -> Example:
    """Example `sample` of `task` at `length` tokens with its needle(s) at `depth` percent."""
    if task not in TASKS:
        raise ValueError(f"task {task!r} is unknown: choose from {', '.join(TASKS)}")
    if not 0 <= depth <= 100:
        raise ValueError(f"depth {depth!r} is invalid: must be a percent in [0, 100]")
    rng = np.random.default_rng([seed, zlib.crc32(task.encode()), sample])
    spec = TASKS[task].spec(rng, depth)
    try:
        ids, needles = build_prompt(codec, length, spec.instruction, spec.needles, spec.question)
    except ValueError as error:
        raise ValueError(f"task {task}: {error}") from None
    return Example(task, length, float(depth), sample, ids, needles, spec.answers)
