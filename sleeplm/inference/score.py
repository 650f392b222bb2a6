"""Scoring long sequences in constant device memory: per-token log-likelihoods and the mean negative log-likelihood,
overall and bucketed by distance from the sequence start (how the loss falls as more context has been evicted and
consolidated into the fast weights).

The sequence goes to the device in blocks of `block_windows` windows; a jitted `lax.scan` over a block's windows
carries the stream state, the logits of the last token and running sums, so the device holds one block and one
window's logits at a time whatever the length, and every block reuses the same compiled function. Token t (t >= 1)
is scored by the logits after tokens < t, exactly as `forward` computes them; token 0 has no prediction.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterable, Iterator
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from tqdm.auto import tqdm

from sleeplm.config import Config
from sleeplm.core.parameters import Params
from sleeplm.core.state import SleepState, init_state
from sleeplm.core.streaming import read, token_log_likelihoods

MAX_BUCKETS = 40  # distance buckets [0, L), [L, 2L), [2L, 4L), ...: 2^38 windows is past any sequence


class ScoreCarry(NamedTuple):
    state: SleepState
    logits: jax.Array  # (B, vocab): the prediction for the next token
    position: jax.Array  # (B,) int32: tokens consumed per row
    nll_sum: jax.Array  # (MAX_BUCKETS,) float32, summed over rows
    count: jax.Array  # (MAX_BUCKETS,) int32


def distance_bucket(position: jax.Array, window: int) -> jax.Array:
    """0 for positions in [0, L), k >= 1 for [2^(k-1) L, 2^k L)."""
    windows = (position // window).astype(jnp.uint32)
    return jnp.where(windows == 0, 0, 32 - lax.clz(windows)).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("config",), donate_argnames=("carry",))
def score_block(params: Params, carry: ScoreCarry, tokens: jax.Array, valid: jax.Array, config: Config):
    """Scores a block (B, K * L) of each row's next tokens; `valid` marks each row's real tokens (a prefix).
    Returns the new carry and the per-token log-likelihoods (B, K * L) (NaN where not scored)."""
    batch, length = tokens.shape
    window = config.sleep.window

    def one_window(carry: ScoreCarry, inputs):
        ids, real = inputs  # (B, L) each
        state, next_logits, predictions = read(params, carry.state, carry.logits, ids, real, config)
        log_likelihood = token_log_likelihoods(predictions, ids)
        position = carry.position[:, None] + jnp.arange(window)
        scored = real & (position > 0)
        buckets = jax.nn.one_hot(distance_bucket(position, window), MAX_BUCKETS, dtype=jnp.float32) * scored[..., None]
        nll_sum = carry.nll_sum - jnp.einsum("bt,btk->k", jnp.where(scored, log_likelihood, 0.0), buckets)
        count = carry.count + jnp.sum(buckets, axis=(0, 1)).astype(jnp.int32)
        carry = ScoreCarry(state, next_logits, carry.position + jnp.sum(real, axis=1), nll_sum, count)
        return carry, jnp.where(scored, log_likelihood, jnp.nan)

    windows = lambda x: jnp.moveaxis(x.reshape(batch, length // window, window), 1, 0)
    carry, log_likelihoods = lax.scan(one_window, carry, (windows(tokens), windows(valid)))
    return carry, jnp.moveaxis(log_likelihoods, 0, 1).reshape(batch, length)


@dataclasses.dataclass
class Score:
    """`tokens`: tokens scored (all rows); `mean_nll`: their mean negative log-likelihood (nats); `buckets`: per
    distance bucket from the sequence start, {"start", "end", "tokens", "mean_nll"} for positions in [start, end);
    `token_log_likelihoods`: (B, T) float32, NaN at position 0, when asked for."""

    tokens: int
    mean_nll: float
    buckets: list[dict]
    token_log_likelihoods: np.ndarray | None = None


def _blocks(sequences: np.ndarray | Iterable[np.ndarray], block: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(ids, valid) blocks of `block` tokens per row from an array (B, T) or an iterator of (B, t) pieces."""
    if isinstance(sequences, np.ndarray):
        pieces = (sequences[:, i : i + block] for i in range(0, sequences.shape[1], block))
    else:
        try:
            pieces = iter(sequences)
        except TypeError:
            raise ValueError(
                f"sequences must be an array (batch, time) of token ids or an iterator of such pieces, got "
                f"{type(sequences).__name__}"
            ) from None
    pending: list[np.ndarray] = []
    held = 0
    for piece in pieces:
        piece = np.asarray(piece)
        if piece.ndim != 2 or not np.issubdtype(piece.dtype, np.integer):
            raise ValueError(f"sequences must come as integer token ids of shape (batch, time), got {piece.shape}")
        pending.append(piece)
        held += piece.shape[1]
        while held >= block:
            joined = np.concatenate(pending, axis=1)
            yield joined[:, :block], np.ones((joined.shape[0], block), bool)
            pending, held = [joined[:, block:]], held - block
    if held:
        joined = np.concatenate(pending, axis=1)
        ids = np.zeros((joined.shape[0], block), joined.dtype)
        ids[:, :held] = joined
        yield ids, np.arange(block)[None, :].repeat(joined.shape[0], 0) < held


def score(
    params: Params,
    sequences: np.ndarray | Iterable[np.ndarray],
    config: Config,
    *,
    block_windows: int = 16,
    keep_token_log_likelihoods: bool = False,
    progress: bool = False,
    total_tokens: int | None = None,
) -> Score:
    """Scores sequences (B, T) of token ids, an array (a memory-mapped one is read block by block) or an iterator of
    (B, t) pieces (for sequences longer than host memory). Device memory does not depend on T."""
    if not config.sleep.eviction_mode.bounded:
        raise ValueError("sleep.eviction='none' keeps every token: scoring in constant memory needs an evicting mode")
    if not isinstance(block_windows, int) or block_windows < 1:
        raise ValueError(f"block_windows={block_windows!r} is invalid: must be a positive integer")
    window, vocab = config.sleep.window, config.model.vocab_size
    if isinstance(sequences, np.ndarray):
        if sequences.ndim != 2 or not np.issubdtype(sequences.dtype, np.integer):
            raise ValueError(
                f"sequences must be integer token ids of shape (batch, time), got shape {sequences.shape} of dtype "
                f"{sequences.dtype}"
            )
        total_tokens = sequences.size
    bar = tqdm(total=total_tokens, disable=not progress, unit="tok", desc="score")
    carry, kept = None, []
    for ids, valid in _blocks(sequences, block_windows * window):
        if ids.size and (ids[valid].min(initial=0) < 0 or ids[valid].max(initial=0) >= vocab):
            bad = ids[valid][(ids[valid] < 0) | (ids[valid] >= vocab)][0]
            raise ValueError(f"token id {int(bad)} is outside the vocabulary: ids must be in [0, {vocab})")
        if carry is None:
            batch = ids.shape[0]
            if not batch:
                raise ValueError(f"sequences have no rows (shape {ids.shape}): nothing to score")
            zeros = jnp.zeros((MAX_BUCKETS,), jnp.float32)
            carry = ScoreCarry(
                init_state(config, batch),
                jnp.zeros((batch, vocab), jnp.float32),
                jnp.zeros((batch,), jnp.int32),
                zeros,
                zeros.astype(jnp.int32),
            )
        carry, log_likelihoods = score_block(params, carry, jnp.asarray(ids, jnp.int32), jnp.asarray(valid), config)
        if keep_token_log_likelihoods:  # on the host: device memory stays one block
            kept.append((np.asarray(jax.device_get(log_likelihoods)), valid))
        bar.update(int(valid.sum()))
    bar.close()
    if carry is None:
        raise ValueError("sequences are empty: nothing to score")
    nll_sum, count = (np.asarray(x, np.float64) for x in jax.device_get((carry.nll_sum, carry.count)))
    buckets = []
    for k in np.flatnonzero(count):
        start, end = (0 if k == 0 else window * 2 ** int(k - 1)), window * 2 ** int(k)
        buckets.append({"start": start, "end": end, "tokens": int(count[k]), "mean_nll": float(nll_sum[k] / count[k])})
    per_token = None
    if keep_token_log_likelihoods:
        per_token = np.concatenate([ll[:, : v.shape[1]] for ll, v in kept], axis=1)
        per_token = per_token[:, : int(np.asarray(jax.device_get(carry.position)).max())]
    total = int(count.sum())
    return Score(total, float(nll_sum.sum() / max(total, 1)), buckets, per_token)
