"""The serving engine: a fixed number of decode slots on the device, each holding one session's stream (in the style
of JetStream's engine API). A prompt is read into one slot at batch 1 (whole windows, sleeping as windows fill);
one jitted decode step samples and feeds a token for every active slot at once (each row at its own position);
a slot whose window is full is slept on alone, at batch 1, whenever the caller chooses: before that row's next
token at the latest, and for an idle session in the background. Rows move between slots and the host as batch-1
`Stream`s. Shapes are fixed (slots) or bucketed (prompt pieces), so sessions coming and going and prompts of any
length never recompile a step once each bucket has been seen.

The engine is synchronous and single-threaded: `sleeplm.inference.scheduler` drives it.
"""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from sleeplm.config import Config
from sleeplm.core.parameters import Params
from sleeplm.core.passes import logits_of
from sleeplm.core.streaming import at_last_token, consume, full_rows, read, sleep_rows, token_log_likelihoods
from sleeplm.experiment.workdir import Workdir
from sleeplm.inference.generate import sample_rows
from sleeplm.inference.streams import Stream, start_stream
from sleeplm.parallel.axes import Rules, rules_named, use_rules
from sleeplm.parallel.mesh import check_divisible, effective_rules, param_shardings, sleep_state_shardings

TOP_LOGPROBS = 5  # alternatives reported per token at most (the OpenAI API's limit)


class PromptLogprobs(NamedTuple):
    """Per prompt token: its log-probability given everything before it (NaN for a stream's very first token)
    and the `TOP_LOGPROBS` most likely tokens there with theirs."""

    token: np.ndarray  # (n,) float32
    top_ids: np.ndarray  # (n, TOP_LOGPROBS) int32
    top: np.ndarray  # (n, TOP_LOGPROBS) float32


class Step(NamedTuple):
    """One decode step's result for the first `rows` slots (rows that were not active hold garbage); the log-probs
    only when asked."""

    tokens: np.ndarray  # (rows,) int32
    logprob: np.ndarray | None  # (rows,) float32, the model's log-probability of the token (before temperature)
    top_ids: np.ndarray | None  # (rows, TOP_LOGPROBS) int32
    top: np.ndarray | None  # (rows, TOP_LOGPROBS) float32


@dataclasses.dataclass(frozen=True)
class SlotSampling:
    """How the slots sample, one entry per slot (see `sleeplm.inference.generate.sample_rows`)."""

    temperature: np.ndarray
    top_k: np.ndarray
    top_p: np.ndarray


def _bucket(length: int, smallest: int) -> int:
    """The padded size of `length` items: the power of two at or above both it and `smallest`."""
    return 1 << (max(length, smallest) - 1).bit_length()


def _log_softmax_top(logits: jax.Array):
    logprobs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    top, top_ids = lax.top_k(logprobs, min(TOP_LOGPROBS, logits.shape[-1]))
    return logprobs, top_ids.astype(jnp.int32), top


def _prefill(params, row: Stream, ids, valid, config: Config, logprobs: bool):
    """Reads the valid prefix of `ids` (1, P) into the batch-1 stream `row`; returns it and, with `logprobs`, the
    prompt's log-probs (the head over every position, which reading alone does not need)."""
    count = jnp.sum(valid, axis=1, dtype=jnp.int32)
    if logprobs:
        state, logits, predictions = read(params, row.state, row.logits, ids, valid, config)
    else:
        hidden, state = consume(params, row.state, ids, valid, config)
        logits = jnp.where(count[:, None] > 0, logits_of(params, at_last_token(hidden, count), config), row.logits)
    new_row = Stream(state, logits, row.keys, row.sampled, row.consumed + count)
    if not logprobs:
        return new_row, None
    _, top_ids, top = _log_softmax_top(predictions)
    token = token_log_likelihoods(predictions, ids)
    token = token.at[:, 0].set(jnp.where(row.consumed > 0, token[:, 0], jnp.nan))  # a first token has no context
    return new_row, PromptLogprobs(token[0], top_ids[0], top[0])


def _decode(params, stream: Stream, active, temperature, top_k, top_p, config: Config, logprobs: bool, rows: int):
    """Samples one token per active row among the first `rows` from its logits and feeds it back (no row may have a
    full window); with `logprobs`, also the model's log-probability of each token and the top alternatives. Rows
    from `rows` on are neither read nor computed."""
    whole, stream = stream, jax.tree.map(lambda a: a[:rows], stream)
    token = sample_rows(stream.logits, stream.keys, stream.sampled, temperature, top_k, top_p)
    step = Step(token, None, None, None)
    if logprobs:
        every, top_ids, top = _log_softmax_top(stream.logits)
        step = Step(token, jnp.take_along_axis(every, token[:, None], axis=-1)[:, 0], top_ids, top)
    hidden, state = consume(params, stream.state, token[:, None], active[:, None], config)
    logits = jnp.where(active[:, None], logits_of(params, hidden[:, 0], config), stream.logits)
    stream = Stream(state, logits, stream.keys, stream.sampled + active, stream.consumed + active)
    return jax.tree.map(lambda a, head: a.at[:rows].set(head), whole, stream), step


def _sleep_slot(params, stream: Stream, slot, config: Config):
    """Sleeps on row `slot` alone (at batch 1): passes 2..N over its full window, then eviction."""
    row = take_row(stream, slot)
    state = sleep_rows(params, row.state, full_rows(row.state, config), config)
    return put_row(stream, row._replace(state=state), slot)


def take_row(stream: Stream, slot) -> Stream:
    """Row `slot` of a stream, as a batch-1 stream."""
    return jax.tree.map(lambda a: lax.dynamic_slice_in_dim(a, slot, 1, axis=0), stream)


def put_row(stream: Stream, row: Stream, slot) -> Stream:
    """`stream` with row `slot` replaced by the batch-1 stream `row`."""
    return jax.tree.map(lambda a, r: lax.dynamic_update_slice_in_dim(a, r.astype(a.dtype), slot, axis=0), stream, row)


def window_position(pos: int, tokens: int, capacity: int, bounded: bool) -> int:
    """A row's position in its window after `tokens` more are fed from `pos`: a full window is slept on (and
    starts again at 0) before a token that follows it, as `consume` does."""
    if not bounded:
        return pos + tokens
    while tokens:
        pos = 0 if pos == capacity else pos
        take = min(tokens, capacity - pos)
        pos, tokens = pos + take, tokens - take
    return pos


class Engine:
    """`slots` decode rows of one model on the device, plus the host-side facts the scheduler reads without a
    device round trip: each slot's position in its window and tokens consumed.

    `capacity`: the most tokens a row holds under the no-eviction mode (None otherwise). `prefill_tokens`: the
    longest prompt piece read in one call (a longer prompt is read piece by piece, so device memory does not grow
    with its length; pieces whose log-probs are asked for are at most `LOGPROB_PIECE` tokens, since they hold the
    head's output at every position); pieces are padded to powers of two from one window up. `mesh` / `rules`:
    parameters and slots sharded as in training (`sleeplm.parallel`), the slots over the batch axes when they
    divide them (else replicated).
    """

    LOGPROB_PIECE = 512

    def __init__(
        self,
        params: Params,
        config: Config,
        *,
        slots: int = 8,
        capacity: int | None = None,
        prefill_tokens: int = 2048,
        mesh: jax.sharding.Mesh | None = None,
        rules: str | Rules = "fsdp+tp",
    ) -> None:
        if not isinstance(slots, int) or isinstance(slots, bool) or slots < 1:
            raise ValueError(f"slots={slots!r} is invalid: must be a positive integer")
        if not isinstance(prefill_tokens, int) or prefill_tokens < config.sleep.window:
            raise ValueError(
                f"prefill_tokens={prefill_tokens!r} is invalid: must be an integer >= the window "
                f"({config.sleep.window})"
            )
        self.config, self.slots, self.mesh = config, slots, mesh
        self.bounded = config.sleep.eviction_mode.bounded
        self.prefill_tokens = _bucket(prefill_tokens, config.sleep.window)
        self.stream = start_stream(config, slots, jax.random.key(0), capacity)
        self.capacity = self.stream.state.capacity
        self.pos = np.zeros(slots, np.int64)  # mirrors stream.state.pos (window_position)
        self.consumed = np.zeros(slots, np.int64)
        stream_sharding = replicated = None
        if mesh is None:  # committed to the device from the start: a step's outputs are, and a step whose
            device = jax.devices()[0]  # arguments change from uncommitted to committed compiles again
            params, self.stream = jax.device_put(params, device), jax.device_put(self.stream, device)
        else:
            rules = dict(rules_named(rules) if isinstance(rules, str) else rules)
            batch = [rules["batch"]] if isinstance(rules.get("batch"), str) else rules.get("batch") or []
            if slots % int(np.prod([mesh.shape[axis] for axis in batch], dtype=int)):
                rules["batch"] = None  # slots that do not divide the batch axes are replicated
            check_divisible(config, slots, mesh, rules)
            self._rules = effective_rules(config, mesh, rules)
            params = jax.device_put(params, param_shardings(config, mesh, self._rules))
            rows = NamedSharding(mesh, P(self._rules["batch"]))
            state = sleep_state_shardings(self.stream.state, mesh, self._rules, config)
            stream_sharding, replicated = Stream(state, rows, rows, rows, rows), NamedSharding(mesh, P())
            self.stream = jax.device_put(self.stream, stream_sharding)
        self.params = params
        static = dict(static_argnames=("config", "logprobs", "rows"))
        with_stream = {} if mesh is None else dict(out_shardings=stream_sharding)
        self._prefill = jax.jit(_prefill, donate_argnames=("row",), static_argnames=("config", "logprobs"))
        self._decode = jax.jit(
            _decode, donate_argnames=("stream",), **static,
            **({} if mesh is None else dict(out_shardings=(stream_sharding, replicated))),
        )  # fmt: skip
        self._sleep = jax.jit(_sleep_slot, donate_argnames=("stream",), static_argnames=("config",), **with_stream)
        self._take = jax.jit(take_row)
        self._put = jax.jit(put_row, donate_argnames=("stream",), **with_stream)

    @classmethod
    def from_workdir(cls, workdir: Path, *, step: int | None = None, **options) -> Engine:
        """An engine over a run's checkpoint (a trained run or a converted Hugging Face model)."""
        run = Workdir(workdir).check()
        experiment = run.experiment()
        params, _ = run.restore_params(experiment, step=step)
        return cls(params, experiment.config, **options)

    def _traced(self) -> contextlib.AbstractContextManager:
        """The mesh and rules in force while a step is traced (nothing without a mesh)."""
        stack = contextlib.ExitStack()
        if self.mesh is not None:
            stack.enter_context(jax.set_mesh(self.mesh))
            stack.enter_context(use_rules(self._rules))
        return stack

    # ---------------------------------------------------------------------------------------------- rows

    def new_row(self, key_data: np.ndarray) -> Stream:
        """An empty batch-1 stream (host arrays) whose sampling key is `key_data` (2,) uint32."""
        key = jax.random.wrap_key_data(jnp.asarray(key_data, jnp.uint32))[None]
        return jax.device_get(start_stream(self.config, 1, key, None if self.bounded else self.capacity))

    def load(self, slot: int, row: Stream) -> None:
        """Puts the batch-1 stream `row` (host or device arrays) into `slot`."""
        with self._traced():
            self.stream = self._put(self.stream, row, jnp.int32(slot))
        self.pos[slot], self.consumed[slot] = int(row.state.pos[0]), int(row.consumed[0])

    def unload(self, slot: int) -> Stream:
        """The stream in `slot` as a batch-1 stream of host arrays (the slot keeps it until overwritten)."""
        with self._traced():
            return jax.device_get(self._take(self.stream, jnp.int32(slot)))

    def reseed(self, slot: int, key_data: np.ndarray) -> None:
        """Gives `slot` a new sampling key and restarts its sample count (what a request's `seed` does)."""
        row = self.unload(slot)
        self.load(slot, row._replace(keys=np.asarray(key_data, np.uint32)[None], sampled=np.zeros(1, np.int32)))

    def warm_up(self) -> None:
        """Compiles every step a server meets (prompt pieces of each size, with and without log-probs, decode steps
        over each number of rows, a sleep), so no request waits for a compile. Only on a fresh engine: it leaves
        garbage in the slots (each session is loaded whole into its slot anyway)."""
        sizes = [_bucket(1, self.config.sleep.window)]
        while sizes[-1] < self.prefill_tokens:
            sizes.append(2 * sizes[-1])
        for logprobs in (False, True):
            for size in sizes:
                if size <= self.piece_tokens(logprobs):
                    self.prefill(0, np.zeros(size, np.int32), logprobs=logprobs)
        self.pos[0] = window_position(0, self.config.sleep.window, self.capacity, self.bounded)
        if self.bounded:
            self.sleep(0)
        rows = 1
        while True:
            for logprobs in (False, True):
                greedy = SlotSampling(*(np.zeros(self.slots), np.zeros(self.slots), np.ones(self.slots)))
                self.decode(np.arange(self.slots) == min(rows, self.slots) - 1, greedy, logprobs=logprobs)
            if rows >= self.slots:
                break
            rows *= 2
        self.pos[:], self.consumed[:] = 0, 0

    # --------------------------------------------------------------------------------------------- steps

    def is_full(self, slot: int) -> bool:
        """Whether `slot`'s window is full and must be slept on before its next token."""
        return self.bounded and self.pos[slot] == self.capacity

    def piece_tokens(self, logprobs: bool) -> int:
        """The most prompt tokens `prefill` reads in one device call."""
        return min(self.prefill_tokens, _bucket(self.LOGPROB_PIECE, 1)) if logprobs else self.prefill_tokens

    def prefill(self, slot: int, prompt: np.ndarray, *, logprobs: bool = False) -> PromptLogprobs | None:
        """Reads `prompt` (n,) ids into `slot`, piece by piece, sleeping as windows fill; with `logprobs`, returns
        each prompt token's log-probability and the top alternatives (a host sync)."""
        prompt = np.asarray(prompt, np.int32).reshape(-1)
        piece_tokens = self.piece_tokens(logprobs)
        parts = []
        with self._traced():
            row = self._take(self.stream, jnp.int32(slot))
            for start in range(0, len(prompt), piece_tokens):
                piece = prompt[start : start + piece_tokens]
                length = _bucket(len(piece), self.config.sleep.window)
                ids, valid = np.zeros((1, length), np.int32), np.zeros((1, length), bool)
                ids[0, : len(piece)], valid[0, : len(piece)] = piece, True
                row, part = self._prefill(self.params, row, jnp.asarray(ids), jnp.asarray(valid), self.config, logprobs)
                if logprobs:
                    parts.append(PromptLogprobs(*(a[: len(piece)] for a in part)))
            self.stream = self._put(self.stream, row, jnp.int32(slot))
        self.pos[slot] = window_position(int(self.pos[slot]), len(prompt), self.capacity, self.bounded)
        self.consumed[slot] += len(prompt)
        if not logprobs:
            return None
        parts = jax.device_get(parts)
        return PromptLogprobs(*(np.concatenate(p) for p in zip(*parts, strict=True)))

    def sleep(self, slot: int) -> None:
        """Sleeps on `slot`'s full window (passes 2..N, then eviction), at batch 1."""
        if not self.is_full(slot):
            raise ValueError(f"slot {slot} has {self.pos[slot]} of {self.capacity} tokens: only a full window sleeps")
        with self._traced():
            self.stream = self._sleep(self.params, self.stream, jnp.int32(slot), self.config)
        self.pos[slot] = 0

    def decode(self, active: np.ndarray, sampling: SlotSampling, *, logprobs: bool = False) -> Step:
        """One token for every active slot (sampled, fed back); reads the results to the host. The step runs over
        the slots up to the last active one, rounded up to a power of two (at most `log2(slots) + 1` compiled
        steps): idle slots past it cost no compute. The results hold those rows only."""
        active = np.asarray(active, bool)
        full = [int(slot) for slot in np.flatnonzero(active) if self.is_full(slot)]
        if full:
            raise ValueError(f"slots {full} have full windows: sleep on them before their next token")
        if not active.any():
            raise ValueError("no slot is active: a decode step needs at least one")
        rows = min(self.slots, _bucket(int(np.flatnonzero(active)[-1]) + 1, 1))
        arrays = (active, sampling.temperature, sampling.top_k, sampling.top_p)
        dtypes = (bool, np.float32, np.int32, np.float32)
        arrays = [jnp.asarray(np.asarray(a, dtype)[:rows]) for a, dtype in zip(arrays, dtypes, strict=True)]
        with self._traced():
            self.stream, step = self._decode(self.params, self.stream, *arrays, self.config, logprobs, rows)
        for slot in np.flatnonzero(active):
            self.pos[slot] = window_position(int(self.pos[slot]), 1, self.capacity, self.bounded)
        self.consumed += active
        return Step(*jax.device_get(step))
