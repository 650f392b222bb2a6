"""Streams: a batch of independent token streams with everything needed to continue them, saved and restored.

A `Stream` holds the `SleepState`, the next-token logits after the last token it consumed, and each row's sampling
key and count of sampled tokens: the PRNG state, since a row's i-th sample uses its key folded with i, so a stream
saved and restored samples exactly what an uninterrupted one would. A saved stream is a directory with the arrays
(orbax) and `stream.json` (the model and sleep config it belongs to), written under a temporary name and renamed,
so it is never half-written.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from sleeplm.config import Config
from sleeplm.core.state import SleepState, init_state
from sleeplm.experiment.files import building
from sleeplm.experiment.workdir import CheckpointError, differences

RECORD = "stream.json"


class Stream(NamedTuple):
    """`state`; `logits` (B, vocab) float32, the next-token logits after the last consumed token; `keys` (B, 2)
    uint32, each row's sampling key (raw key data, so a stream saves as plain arrays); `sampled` (B,) int32, tokens
    sampled so far per row; `consumed` (B,) int32, tokens fed so far per row."""

    state: SleepState
    logits: jax.Array
    keys: jax.Array
    sampled: jax.Array
    consumed: jax.Array


def start_stream(config: Config, batch_size: int, key: jax.Array, capacity: int | None = None) -> Stream:
    """An empty stream of `batch_size` rows. `key` is one PRNG key (row b samples with it folded with b) or one
    key per row (a batch of keys), so a row sampled alone with its own key draws what it draws in a batch.
    `capacity`: the no-eviction mode's most tokens per row (see `init_state`)."""
    # A copy, never the caller's buffer: the stream is donated, and the caller's keys must outlive it.
    keys = jnp.array(jax.random.key_data(_row_keys(key, batch_size)), copy=True)
    counts = lambda: jnp.zeros((batch_size,), jnp.int32)  # a buffer each: the stream is donated
    logits = jnp.zeros((batch_size, config.model.vocab_size), jnp.float32)
    return Stream(init_state(config, batch_size, capacity), logits, keys, counts(), counts())


def _row_keys(key: jax.Array, batch_size: int) -> jax.Array:
    if not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        raise ValueError(f"key must be a typed PRNG key (jax.random.key), got dtype {key.dtype}")
    default = jax.random.key_impl(jax.random.key(0))
    if str(jax.random.key_impl(key)) != str(default):  # the stream keeps raw key data of the default kind
        raise ValueError(f"key uses the PRNG {jax.random.key_impl(key)}: streams take the default one, {default}")
    if key.ndim == 0:
        return jax.vmap(lambda b: jax.random.fold_in(key, b))(jnp.arange(batch_size))
    if key.shape != (batch_size,):
        raise ValueError(f"key has shape {key.shape}: give one key, or one per row ({batch_size},)")
    return key


def config_record(config: Config) -> dict:
    """The parts of a config a stream's arrays depend on (the model and the sleep settings), as JSON."""
    return json.loads(
        json.dumps({"model": dataclasses.asdict(config.model), "sleep": dataclasses.asdict(config.sleep)})
    )


def _record(config: Config, stream: Stream) -> dict:
    return {"config": config_record(config), "batch": stream.sampled.shape[0], "capacity": stream.state.capacity}


def save_stream(path: Path, stream: Stream, config: Config) -> Path:
    """Saves `stream` (of `config`) to the directory `path`, which must not exist yet."""
    path = Path(path).absolute()
    if path.exists():
        raise FileExistsError(f"{path} exists: save a stream to a new directory")
    with building(path) as staging:
        checkpointer = ocp.StandardCheckpointer()
        checkpointer.save(staging / "arrays", {str(i): leaf for i, leaf in enumerate(jax.tree.leaves(stream))})
        checkpointer.wait_until_finished()
        (staging / RECORD).write_text(json.dumps(_record(config, stream), indent=2) + "\n")
    return path


def restore_stream(path: Path, config: Config) -> Stream:
    """The stream saved in `path`; fails naming what differs when it was saved for another config."""
    path = Path(path).absolute()
    if not (path / RECORD).exists():
        raise CheckpointError(f"{path / RECORD} does not exist: {path} is not a saved stream")
    saved = json.loads((path / RECORD).read_text())
    capacity = None if config.sleep.eviction_mode.bounded else saved["capacity"]
    template = start_stream(config, saved["batch"], jax.random.key(0), capacity)
    mismatch = differences(saved["config"], _record(config, template)["config"], "config.")
    if mismatch:
        raise CheckpointError(f"stream {path} was saved for another config: " + "; ".join(mismatch[:5]))
    leaves, treedef = jax.tree.flatten(template)
    abstract = {str(i): jax.ShapeDtypeStruct(leaf.shape, leaf.dtype) for i, leaf in enumerate(leaves)}
    try:
        arrays = ocp.StandardCheckpointer().restore(path / "arrays", abstract)
    except Exception as error:
        raise CheckpointError(f"stream {path} is corrupted ({type(error).__name__}: {error})") from error
    return jax.tree.unflatten(treedef, [arrays[str(i)] for i in range(len(leaves))])
