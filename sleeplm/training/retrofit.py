"""Retrofitting a trained model with new mixers (the paper's recipe for attention-only models): blocks of a mixer
kind ("gdn" by default), without an MLP, inserted at chosen depths. Each inserted block starts silenced (its
kind's `silence`: a zero output projection), so the model computes exactly what it did before, and its parameters
are declared new (`ModelConfig.inserted_blocks`), so `train.trainable="new"` can train them alone first.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax

from sleeplm.config import ModelConfig
from sleeplm.model.kinds import mixer_kind


def parse_positions(text: str) -> tuple[int, ...]:
    """ "2,5" -> (2, 5)."""
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise ValueError(f"--insert-gdn-at {text!r} is invalid: give block positions such as 2,5") from None


def insert_blocks(model: ModelConfig, at: tuple[int, ...], kind: str = "gdn") -> ModelConfig:
    """`model` with a `kind` block inserted before each original block i of `at` (0 .. number of blocks; i = the
    number of blocks is after the last). Blocks inserted earlier stay declared inserted."""
    blocks = len(model.layers)
    if not at or len(set(at)) != len(at) or not all(0 <= i <= blocks for i in at):
        raise ValueError(f"insert positions {at} are invalid: give distinct positions in [0, {blocks}]")
    mixer_kind(kind, field="insert kind")
    layers, inserted, origin = list(model.layers), [], original_blocks(blocks, at)
    for count, position in enumerate(sorted(at)):
        layers.insert(position + count, kind)
        inserted.append(position + count)
    moved = [origin.index(i) for i in model.inserted_blocks]
    return dataclasses.replace(model, layers=tuple(layers), inserted_blocks=tuple(sorted(inserted + moved)))


def original_blocks(blocks: int, at: tuple[int, ...]) -> list[int | None]:
    """For each block after inserting at `at` into a stack of `blocks`: its index before, or None if inserted."""
    origin: list[int | None] = []
    for i in range(blocks + 1):
        origin += [None] * sum(1 for p in at if p == i)
        if i < blocks:
            origin.append(i)
    return origin


def retrofit_params(source: dict, fresh: dict, retrofitted: ModelConfig, at: tuple[int, ...]) -> dict:
    """The parameters of `retrofitted` (= `insert_blocks(model, at, kind)`) from `source` (the parameters of
    `model`) and `fresh` (freshly initialised ones of `retrofitted`): every original block, the embedding, final
    norm and head from `source`; each inserted block from `fresh`, its mixer silenced. Works on numpy or jax
    arrays, and under jit."""
    source, fresh = source["params"], fresh["params"]
    out = {name: value for name, value in source.items() if not name.startswith("blocks_")}
    for new, old in enumerate(original_blocks(len(retrofitted.layers) - len(at), at)):
        if old is None:
            kind = retrofitted.layers[new]
            block = dict(fresh[f"blocks_{new}"])
            block[kind] = mixer_kind(kind).silence(block[kind])
            out[f"blocks_{new}"] = block
        else:
            out[f"blocks_{new}"] = source[f"blocks_{old}"]
    return {"params": out}


def count_parameters(params: Any) -> int:
    """The number of scalars in a params tree."""
    return sum(int(x.size) for x in jax.tree.leaves(params))
