"""Checks at the public boundaries of the method: a config's registry names (where a config is first used), token
ids and packed-row masks (when they are concrete)."""

from __future__ import annotations

import functools
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np

from sleeplm.config import Config
from sleeplm.model.kinds import mixer_kind
from sleeplm.ops import implementation_names


@functools.lru_cache(maxsize=256)
def check_config(config: Config) -> None:
    """Checks what a config names in a registry: each block's mixer kind (which then checks the model fields it
    needs) and the gated-delta-rule implementation. Run where a config is first used (parameters, states, the
    forward pass, an experiment), since the registries may grow after the config is made."""
    model = config.model
    for i, kind in enumerate(model.layers):
        mixer_kind(kind, field=f"layers[{i}]").check_config(model)
    if model.gdn_implementation not in implementation_names():
        raise ValueError(
            f"gdn_implementation={model.gdn_implementation!r} is invalid: allowed are {implementation_names()}"
        )


def check_tokens(tokens: jax.Array, config: Config) -> None:
    """Token ids must be a (batch, time) integer array inside the vocabulary. The range is checked when the ids are
    concrete (outside a jit); ids outside it would otherwise give NaN logits or wrap around silently."""
    chex.assert_rank(tokens, 2)
    if not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise ValueError(f"tokens must be integer ids of shape (batch, time), got dtype {tokens.dtype}")
    if isinstance(tokens, jax.core.Tracer) or tokens.size == 0:
        return
    with jax.ensure_compile_time_eval():  # two scalars, evaluated now even inside an enclosing trace
        low, high = (int(x) for x in jax.device_get((jnp.min(tokens), jnp.max(tokens))))
    if low < 0 or high >= config.model.vocab_size:
        bad = low if low < 0 else high
        raise ValueError(f"token id {bad} is outside the vocabulary: ids must be in [0, {config.model.vocab_size})")


def check_masks(shape: tuple[int, int], valid: Any, document_start: Any, window: int) -> None:
    """Packed-row masks (B, T) as the caller gave them (None: the default), checked when concrete: within each
    window of L, `valid` is a prefix (a document's last window is padded at its end), padding only ends a document,
    and a document starts only at a window start, on a valid token. Defaults are not read (no transfer)."""
    given = [mask for mask in (valid, document_start) if mask is not None]
    if not given or any(isinstance(mask, jax.core.Tracer) for mask in given):
        return
    valid = np.ones(shape, bool) if valid is None else np.asarray(jax.device_get(valid), bool)
    document_start = (
        np.zeros(shape, bool) if document_start is None else np.asarray(jax.device_get(document_start), bool)
    )
    batch, length = shape
    padded = np.zeros((batch, -(-length // window) * window), bool)
    padded[:, :length] = valid
    windows = padded.reshape(batch, -1, window)
    rows, windows_index, offsets = np.nonzero(windows[:, :, 1:] & ~windows[:, :, :-1])
    if rows.size:
        raise ValueError(
            f"valid is not a prefix of each window of {window} tokens: row {rows[0]} has a valid token at position "
            f"{windows_index[0] * window + offsets[0] + 1} after padding (pad a document's last window at its end)"
        )
    starts = np.zeros_like(padded)
    starts[:, :length] = document_start
    first_valid, first_start = windows[:, 1:, 0], starts.reshape(batch, -1, window)[:, 1:, 0]
    rows, after = np.nonzero(~windows[:, :-1].all(-1) & first_valid & ~first_start)
    if rows.size:
        raise ValueError(
            f"row {rows[0]} continues a document at position {(after[0] + 1) * window} after a window with padding: "
            "padding may only end a document (the next window starts another, with document_start, or is padding)"
        )
    off = np.argwhere(document_start & ((np.arange(length) % window != 0) | ~valid))
    if off.size:
        row, position = off[0]
        raise ValueError(
            f"document_start is True at row {row}, position {position}: documents must start at a window start "
            f"(a multiple of {window}) on a valid token"
        )


def sequence_masks(tokens, valid, document_start):
    valid = jnp.ones(tokens.shape, bool) if valid is None else jnp.asarray(valid, bool)
    document_start = jnp.zeros(tokens.shape, bool) if document_start is None else jnp.asarray(document_start, bool)
    chex.assert_equal_shape([tokens, valid, document_start])
    return valid, document_start
