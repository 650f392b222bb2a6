"""Generation with sleep: prompt processing in whole windows, then sampling in a jitted `lax.while_loop`, over a
`sleeplm.streams.Stream` of independent rows. Rows never influence each other: each has its own position in its own
window and sleeps when its own window fills and more tokens follow (docs/method.md, "Windows, wake and sleep")."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from sleeplm.config import Config
from sleeplm.core.parameters import Params
from sleeplm.core.passes import logits_of
from sleeplm.core.streaming import at_last_token, consume, full_rows, sleep_rows
from sleeplm.inference.streams import Stream

SLEEP_POLICIES = ("on_full", "deferred")
NO_TOKEN = -1  # in the returned tokens: positions after a row stopped


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How the next token is chosen from the logits: `temperature` 0 is greedy (argmax); otherwise a sample from
    softmax(logits / temperature) restricted to the `top_k` most likely tokens (None: all) and to the smallest set
    whose probability reaches `top_p` (1: all)."""

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if not self.temperature >= 0:
            raise ValueError(f"temperature={self.temperature!r} is invalid: must be >= 0 (0 is greedy)")
        if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k < 1):
            raise ValueError(f"top_k={self.top_k!r} is invalid: must be a positive integer or None")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p!r} is invalid: must be in (0, 1]")


def sample(logits: jax.Array, keys: jax.Array, sampled: jax.Array, sampling: Sampling) -> jax.Array:
    """The next token of each row (B,) int32 from its logits (B, vocab), its key (B, 2) and its sample count,
    every row with the same `sampling`."""
    batch = logits.shape[0]
    top_k = 0 if sampling.top_k is None else sampling.top_k
    rows = (jnp.full((batch,), v, dtype) for v, dtype in ((sampling.temperature, jnp.float32), (top_k, jnp.int32)))
    return sample_rows(logits, keys, sampled, *rows, jnp.full((batch,), sampling.top_p, jnp.float32))


def sample_rows(
    logits: jax.Array,
    keys: jax.Array,
    sampled: jax.Array,
    temperature: jax.Array,
    top_k: jax.Array,
    top_p: jax.Array,
) -> jax.Array:
    """`sample` with each row's own settings, (B,) arrays: `temperature` (0: greedy), `top_k` (0: all tokens),
    `top_p`, so rows of different requests share one compiled step. The work each filter needs is done only when
    some row asks for it."""
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def draw(logits):
        scaled = logits / jnp.where(temperature > 0, temperature, 1.0)[:, None]

        def keep_top_k(scaled):
            ordered = -jnp.sort(-scaled, axis=-1)
            kth = jnp.take_along_axis(ordered, jnp.clip(top_k - 1, 0, scaled.shape[-1] - 1)[:, None], axis=-1)
            return jnp.where((top_k[:, None] > 0) & (scaled < kth), -jnp.inf, scaled)

        def keep_top_p(scaled):
            order = jnp.argsort(-scaled, axis=-1)
            probabilities = jax.nn.softmax(jnp.take_along_axis(scaled, order, axis=-1), axis=-1)
            before = jnp.cumsum(probabilities, axis=-1) - probabilities  # mass of the more likely tokens
            rows = jnp.arange(scaled.shape[0])[:, None]
            kept = jnp.zeros_like(scaled, bool).at[rows, order].set(before < top_p[:, None])
            return jnp.where(kept | (top_p[:, None] >= 1), scaled, -jnp.inf)

        scaled = lax.cond(jnp.any(top_k > 0), keep_top_k, lambda s: s, scaled)
        scaled = lax.cond(jnp.any(top_p < 1), keep_top_p, lambda s: s, scaled)
        row_keys = jax.vmap(jax.random.fold_in)(jax.random.wrap_key_data(keys), sampled)
        return jax.vmap(jax.random.categorical)(row_keys, scaled).astype(jnp.int32)

    drawn = lax.cond(jnp.any(temperature > 0), draw, lambda logits: greedy, logits)
    return jnp.where(temperature > 0, drawn, greedy)


@functools.partial(
    jax.jit,
    static_argnames=("config", "max_tokens", "sampling", "sleep"),
    donate_argnames=("stream",),
)
def _generate(params, stream, prompt, prompt_valid, stops, max_new_tokens, config, max_tokens, sampling, sleep):
    state, logits = stream.state, stream.logits
    if prompt.shape[1]:  # prompt processing: each row's tokens in whole windows (one step per window)
        hidden, state = consume(params, state, prompt, prompt_valid, config)
        count = jnp.sum(prompt_valid, axis=1)
        logits = jnp.where(count[:, None] > 0, logits_of(params, at_last_token(hidden, count), config), logits)
    consumed = stream.consumed + jnp.sum(prompt_valid, axis=1, dtype=jnp.int32)
    batch = prompt.shape[0]

    def more(carry):
        step, _, _, _, _, done, _ = carry
        return (step < max_new_tokens) & ~jnp.all(done)

    def one_token(carry):
        step, state, logits, sampled, consumed, done, out = carry
        token = jnp.where(done, NO_TOKEN, sample(logits, stream.keys, sampled, sampling))
        out = out.at[:, step].set(token)
        live = ~done
        hidden, state = consume(params, state, jnp.maximum(token, 0)[:, None], live[:, None], config)
        logits = jnp.where(live[:, None], logits_of(params, hidden[:, 0], config), logits)
        done = done | jnp.isin(token, stops)
        return step + 1, state, logits, sampled + live, consumed + live, done, out

    out = jnp.full((batch, max_tokens), NO_TOKEN, jnp.int32)  # max_tokens >= max_new_tokens (a compile bucket)
    carry = (0, state, logits, stream.sampled, consumed, jnp.zeros((batch,), bool), out)
    _, state, logits, sampled, consumed, _, out = lax.while_loop(more, one_token, carry)
    if sleep == "on_full":
        state = sleep_rows(params, state, full_rows(state, config), config)
    return out, Stream(state, logits, stream.keys, sampled, consumed)


class Generation(NamedTuple):
    """`tokens` (B, max_new_tokens) int32, each row's new tokens then NO_TOKEN after it stopped; `lengths` (B,)
    new tokens per row (a stop token included); `stream`, to continue from."""

    tokens: np.ndarray
    lengths: np.ndarray
    stream: Stream


def _bucket(length: int) -> int:
    """The padded size of `length` items: a power of two (0 stays 0), so calls of similar sizes share a compile."""
    return 0 if length == 0 else 1 << (length - 1).bit_length()


def _pad_prompts(prompts, vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Ragged prompts (a sequence of id sequences) -> right-padded ids (B, P) and the valid mask, P a power of two."""
    rows = []
    for i, prompt in enumerate(prompts):
        try:
            rows.append(np.asarray(prompt).reshape(-1))
        except (TypeError, ValueError):  # ragged nesting, objects numpy cannot hold in an array
            raise ValueError(f"prompt {i} must be a sequence of integer token ids, got {prompt!r:.80}") from None
    for i, row in enumerate(rows):
        if row.size and not np.issubdtype(row.dtype, np.integer):
            raise ValueError(f"prompt {i} must hold integer token ids, got dtype {row.dtype}")
        bad = row[(row < 0) | (row >= vocab_size)]
        if bad.size:
            raise ValueError(
                f"prompt {i} has token id {int(bad[0])} outside the vocabulary: ids must be in [0, {vocab_size})"
            )
    length = _bucket(max(len(row) for row in rows))
    ids = np.zeros((len(rows), length), np.int32)
    valid = np.zeros((len(rows), length), bool)
    for i, row in enumerate(rows):
        ids[i, : len(row)], valid[i, : len(row)] = row, True
    return ids, valid


def generate(
    params: Params,
    stream: Stream,
    prompts: Sequence[Sequence[int]],
    config: Config,
    *,
    max_new_tokens: int,
    sampling: Sampling = Sampling(),
    stop_tokens: Sequence[int] = (),
    sleep: str = "on_full",
) -> Generation:
    """Feeds each row its prompt (ragged: one id sequence per row; empty continues a stream that has consumed
    tokens), then samples up to `max_new_tokens` tokens per row, each fed back in, until a row samples one of
    `stop_tokens`. A window that fills is slept on before the next token, exactly as `forward` does; `sleep`
    says when a window that fills with the last token is slept on: "on_full" (now, before returning) or
    "deferred" (when the next token arrives, so an interactive reply returns sooner). Both give identical tokens.
    `stream` is donated; continue from the returned one.
    """
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens!r} is invalid: must be a positive integer")
    if sleep not in SLEEP_POLICIES:
        raise ValueError(f"sleep={sleep!r} is invalid: choose one of {SLEEP_POLICIES}")
    batch = stream.consumed.shape[0]
    if len(prompts) != batch:
        raise ValueError(f"got {len(prompts)} prompts for a stream of {batch} rows: give one prompt per row")
    bad = [t for t in stop_tokens if not isinstance(t, (int, np.integer)) or isinstance(t, (bool, np.bool_))]
    if bad:
        raise ValueError(f"stop token {bad[0]!r} is invalid: stop tokens must be integer token ids")
    stop_tokens = tuple(int(t) for t in stop_tokens)
    for token in stop_tokens:
        if not 0 <= token < config.model.vocab_size:
            raise ValueError(f"stop token {token} is outside the vocabulary [0, {config.model.vocab_size})")
    ids, valid = _pad_prompts(prompts, config.model.vocab_size)
    consumed = np.asarray(jax.device_get(stream.consumed))
    empty = [i for i in range(batch) if not valid[i].any() and consumed[i] == 0]
    if empty:
        raise ValueError(f"prompt {empty[0]} is empty and its stream has no tokens yet: a prompt needs at least one")
    if not config.sleep.eviction_mode.bounded:
        needed = consumed + valid.sum(axis=1) + max_new_tokens
        if needed.max() > stream.state.capacity:
            raise ValueError(
                f"prompt {int(needed.argmax())} needs {int(needed.max())} tokens of the stream's capacity "
                f"{stream.state.capacity} (sleep.eviction='none' keeps every token): start a stream with more capacity"
            )
    stops = np.full((max(_bucket(len(stop_tokens)), 1),), NO_TOKEN, np.int32)  # NO_TOKEN is never sampled
    stops[: len(stop_tokens)] = stop_tokens
    tokens, stream = _generate(
        params,
        stream,
        jnp.asarray(ids),
        jnp.asarray(valid),
        jnp.asarray(stops),
        max_new_tokens,
        config,
        _bucket(max_new_tokens),
        sampling,
        sleep,
    )
    tokens = np.asarray(jax.device_get(tokens))[:, :max_new_tokens]
    return Generation(tokens, (tokens != NO_TOKEN).sum(axis=1), stream)
