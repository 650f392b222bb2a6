"""The serving loop: requests from any thread, one engine thread that owns the device (continuous batching over the
engine's slots), sessions that outlive requests, and sleep moved off the latency path.

Each request continues a session's stream (or a one-off stream): its prompt is read into the session's slot, then
every active slot gets one token per decode step until its reply stops; requests join and leave between steps.
A window that fills is slept on before that row's next token, as the method requires; a window that fills with a
reply's last token is slept on after the reply has ended, while the session is idle (a background sleep, one per
loop turn, between other sessions' decode steps), so neither that reply nor the next one waits for it unless the
next arrives first. Sessions beyond the slots move to host memory and then to disk (`SessionStore`); with a state
directory every completed request's state is on disk before the reply is reported finished, so a server killed at
any moment restarts with every session at its last completed request.

Events reach the caller through its `on_event` callback, called on the engine thread: keep it short (hand the event
to another thread or event loop).
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import queue
import secrets
import shutil
import tempfile
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import numpy as np

from sleeplm.inference.engine import Engine, SlotSampling
from sleeplm.inference.generate import Sampling
from sleeplm.inference.sessions import SessionStore, check_session_id, row_bytes
from sleeplm.inference.text import TextStream

log = logging.getLogger(__name__)
MAX_LOGPROBS = 5


# -------------------------------------------------------------------------------------------------- the protocol


@dataclasses.dataclass(frozen=True)
class Request:
    """One reply: feed `prompt` into the stream of `session` (None: a one-off stream, freed afterwards), then
    sample up to `max_tokens` tokens, stopping after one of `stop_tokens` or once the decoded reply contains one of
    `stop_strings`. `seed` re-seeds the stream's sampling (a row's i-th sample after it uses the seed's key folded
    with i, as `generate` does); a new stream without one gets a random seed. `prompt_logprobs` / `logprobs`: the
    number of alternatives (0-5) to report with each prompt / sampled token's log-probability, or None."""

    prompt: tuple[int, ...]
    max_tokens: int
    sampling: Sampling = dataclasses.field(default_factory=Sampling)
    stop_tokens: tuple[int, ...] = ()
    stop_strings: tuple[str, ...] = ()
    seed: int | None = None
    session: str | None = None
    prompt_logprobs: int | None = None
    logprobs: int | None = None


@dataclasses.dataclass(frozen=True)
class PromptLogprobs:
    """Each prompt token's log-probability (None for a stream's very first token) and its top alternatives."""

    token_logprobs: list[float | None]
    top: list[dict[int, float] | None]


@dataclasses.dataclass(frozen=True)
class Token:
    id: int
    logprob: float | None = None
    top: dict[int, float] | None = None


@dataclasses.dataclass(frozen=True)
class Finished:
    """The reply ended: "stop" (a stop token or string), "length" (max_tokens) or "cancelled"."""

    reason: str
    prompt_tokens: int
    completion_tokens: int


@dataclasses.dataclass(frozen=True)
class Failed:
    error: Exception


Event = PromptLogprobs | Token | Finished | Failed


class RequestError(ValueError):
    """A request field is invalid; `field` names it."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field, self.message = field, message


class UnknownSession(KeyError):
    def __init__(self, session: str) -> None:
        super().__init__(f"session {session!r} does not exist: create it first (POST /v1/sessions)")
        self.session = session

    def __str__(self) -> str:
        return self.args[0]


class SessionExists(RuntimeError):
    def __init__(self, session: str) -> None:
        super().__init__(f"session {session!r} exists already: choose another id, or continue it")
        self.session = session


class SessionBusy(RuntimeError):
    def __init__(self, session: str) -> None:
        super().__init__(f"session {session!r} has a request running or queued: wait for it to finish")
        self.session = session


@dataclasses.dataclass(eq=False)
class Handle:
    """A submitted request and where its events go."""

    request: Request
    on_event: Callable[[Event], None]
    session: str
    one_off: bool
    cancelled: bool = False
    slot: int | None = None
    unread: tuple[int, ...] = ()  # prompt tokens not read yet
    text: TextStream | None = None  # the reply's text, where stop strings are looked for
    scored: list = dataclasses.field(default_factory=list)  # the prompt's log-probs, piece by piece
    generated: list[int] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class _Session:
    """What any thread may read about a session (under the scheduler's lock)."""

    committed: int  # tokens its stream will hold once its accepted requests end (at most)
    queued: int = 0  # requests accepted and not finished
    consumed: int = 0


def _session_name(name: object, field: str) -> str:
    try:
        return check_session_id(name)
    except ValueError as error:
        raise RequestError(field, str(error)) from None


def key_data(seed: int) -> np.ndarray:
    """The sampling key of a stream seeded with `seed`: what `start_stream(config, 1, jax.random.key(seed))` gives
    its row, so a served reply samples what `generate` samples for the same seed."""
    return np.asarray(jax.random.key_data(jax.random.fold_in(jax.random.key(seed), 0)))


# -------------------------------------------------------------------------------------------------- the scheduler


class Scheduler:
    """Serves requests on `engine` from a thread of its own (`start` / `stop`).

    `state_dir`: where sessions are kept across restarts (None: sessions live as long as the process, offloaded
    to a scratch directory). `host_sessions`: sessions kept in host memory beyond the slots. `max_tokens_limit`:
    the most tokens one reply may ask for. `decode`: ids -> text, needed for stop strings.
    """

    def __init__(
        self,
        engine: Engine,
        *,
        state_dir: Path | None = None,
        host_sessions: int = 64,
        max_tokens_limit: int = 4096,
        decode: Callable[[Sequence[int]], str] | None = None,
    ) -> None:
        if not isinstance(max_tokens_limit, int) or max_tokens_limit < 1:
            raise ValueError(f"max_tokens_limit={max_tokens_limit!r} is invalid: must be a positive integer")
        self.engine, self.config = engine, engine.config
        self.max_tokens_limit, self.decode = max_tokens_limit, decode
        self._scratch = None if state_dir is not None else Path(tempfile.mkdtemp(prefix="sleeplm-sessions-"))
        directory = Path(state_dir) / "sessions" if state_dir is not None else self._scratch
        self.store = SessionStore(
            directory, self.config, engine.new_row(key_data(0)), host_sessions, state_dir is not None
        )
        self._lock = threading.Lock()
        self._sessions = {
            name: _Session(consumed, consumed=consumed) for name, consumed in self.store.saved_sessions().items()
        }
        self._inbox: queue.Queue = queue.Queue()
        self._waiting: list[Handle] = []
        self._reading: dict[int, Handle] = {}  # slot -> request whose prompt is being read
        self._active: dict[int, Handle] = {}  # slot -> request being replied to
        self._slot_session: list[str | None] = [None] * engine.slots
        self._last_used = [0] * engine.slots
        self._clock = itertools.count(1)
        self._version: dict[str, int] = {}  # requests each session has started (its stored state's version)
        self._thread: threading.Thread | None = None
        self._running = False
        self.background_sleeps = 0  # sleeps run while their session was idle (for tests and metrics)

    # ------------------------------------------------------------------------------------ any thread

    def start(self) -> Scheduler:
        self._running = True
        self._thread = threading.Thread(target=self._loop, name="sleeplm-engine", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Ends the engine thread after its current step; waiting and running requests fail."""
        self._running = False
        self._inbox.put(None)
        if self._thread is not None:
            self._thread.join()
        self.store.close()
        if self._scratch is not None:
            shutil.rmtree(self._scratch, ignore_errors=True)

    def create_session(self, session_id: str | None = None) -> str:
        """A new, empty session (named `session_id`, or a fresh random name); with a state directory its file is
        written at once, so it outlives a restart even before its first request."""
        session_id = secrets.token_hex(8) if session_id is None else _session_name(session_id, "id")
        with self._lock:
            if session_id in self._sessions:
                raise SessionExists(session_id)
            self._sessions[session_id] = _Session(0)
        if self.store.durable:
            self.store.save(session_id, self.engine.new_row(key_data(secrets.randbits(63))), 0)
        return session_id

    def delete_session(self, session_id: str) -> None:
        with self._lock:
            session = self._session(session_id)
            if session.queued:
                raise SessionBusy(session_id)
            del self._sessions[session_id]
        self._inbox.put(("delete", session_id))

    def session_info(self, session_id: str) -> dict:
        """Tokens the session has consumed, where its stream is (slot, host or disk) and its size in bytes."""
        with self._lock:
            session = self._session(session_id)
            info = {"id": session_id, "tokens": session.consumed, "busy": session.queued > 0}
        where = "slot" if session_id in self._slot_session else self.store.location(session_id) or "new"
        return info | {"location": where, "state_bytes": row_bytes(self.store.template)}

    def sessions(self) -> list[str]:
        with self._lock:
            return sorted(self._sessions)

    def submit(self, request: Request, on_event: Callable[[Event], None]) -> Handle:
        """Checks `request` (RequestError naming the field, UnknownSession) and queues it."""
        self._check(request)
        one_off = request.session is None
        with self._lock:
            session_id = secrets.token_hex(8) if one_off else request.session
            session = _Session(0) if one_off else self._session(session_id)
            if not request.prompt and session.committed == 0:
                raise RequestError("prompt", "is empty and the session has no tokens yet: give at least one token")
            needed = session.committed + len(request.prompt) + request.max_tokens
            if not self.engine.bounded and needed > self.engine.capacity:
                raise RequestError(
                    "prompt" if needed - request.max_tokens > self.engine.capacity else "max_tokens",
                    f"the session would hold {needed} tokens, over the capacity of {self.engine.capacity} "
                    f"(sleep.eviction={self.config.sleep.eviction!r} keeps every token)",
                )
            session.committed, session.queued = needed, session.queued + 1
            self._sessions[session_id] = session
        handle = Handle(request, on_event, session_id, one_off)
        self._inbox.put(handle)
        return handle

    def cancel(self, handle: Handle) -> None:
        """Ends the request at the engine's next step (the client went away)."""
        handle.cancelled = True
        self._inbox.put(("cancel", handle))

    def _session(self, session_id: str) -> _Session:
        if session_id not in self._sessions:
            raise UnknownSession(session_id)
        return self._sessions[session_id]

    def _check(self, request: Request) -> None:
        vocab = self.config.model.vocab_size
        ids = np.asarray(request.prompt)
        if ids.size and (not np.issubdtype(ids.dtype, np.integer) or ids.ndim != 1):
            raise RequestError("prompt", "must be a list of integer token ids")
        bad = ids[(ids < 0) | (ids >= vocab)] if ids.size else ids
        if bad.size:
            raise RequestError("prompt", f"token id {int(bad[0])} is outside the vocabulary: ids are in [0, {vocab})")
        if not isinstance(request.max_tokens, int) or not 0 <= request.max_tokens <= self.max_tokens_limit:
            raise RequestError(
                "max_tokens", f"{request.max_tokens!r} must be an integer in [0, {self.max_tokens_limit}]"
            )
        for name in ("prompt_logprobs", "logprobs"):
            value = getattr(request, name)
            if value is not None and (not isinstance(value, int) or not 0 <= value <= MAX_LOGPROBS):
                raise RequestError(name, f"{value!r} must be an integer in [0, {MAX_LOGPROBS}] or absent")
        for token in request.stop_tokens:
            if not isinstance(token, int) or not 0 <= token < vocab:
                raise RequestError("stop", f"stop token {token!r} is outside the vocabulary [0, {vocab})")
        if request.stop_strings and self.decode is None:
            raise RequestError("stop", "stop strings need a model with a tokenizer")
        if request.seed is not None and (not isinstance(request.seed, int) or not 0 <= request.seed < 2**63):
            raise RequestError("seed", f"{request.seed!r} must be an integer in [0, 2**63)")
        if request.session is not None:
            _session_name(request.session, "session")

    # ---------------------------------------------------------------------------------- the engine thread

    def _loop(self) -> None:
        try:
            while self._running:
                self._receive(block=not (self._waiting or self._reading or self._active or self._idle_full_slots()))
                self._admit()
                self._read_prompts()
                if self._active:
                    self._step()
                idle_full = self._idle_full_slots()
                if idle_full:  # one background sleep per turn: other sessions' tokens go on between them
                    self.engine.sleep(idle_full[0])
                    self.background_sleeps += 1
        except Exception as error:  # the device failed: every request in flight learns why
            log.exception("the engine thread failed")
            self._fail_all(error)
            raise
        self._fail_all(RuntimeError("the server is shutting down"))

    def _fail_all(self, error: Exception) -> None:
        for handle in [*self._waiting, *self._reading.values(), *self._active.values()]:
            handle.on_event(Failed(error))
        self._waiting.clear()
        self._reading.clear()
        self._active.clear()

    def _receive(self, block: bool) -> None:
        try:
            message = self._inbox.get(timeout=1.0 if block else None) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            if isinstance(message, Handle):
                self._waiting.append(message)
            elif message is not None and message[0] == "cancel":
                self._cancel(message[1])
            elif message is not None and message[0] == "delete":
                self._drop(message[1])
            try:
                message = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _cancel(self, handle: Handle) -> None:
        if handle in self._waiting:
            self._waiting.remove(handle)
            self._finish(handle, "cancelled", prompt_read=False)
        elif handle.slot is not None and self._reading.get(handle.slot) is handle:
            del self._reading[handle.slot]
            self._finish(handle, "cancelled", active=False)
        elif handle.slot is not None and self._active.get(handle.slot) is handle:
            self._finish(handle, "cancelled")

    def _drop(self, session_id: str) -> None:
        """Frees a deleted session's slot, host copy and file."""
        if session_id in self._slot_session:
            self._slot_session[self._slot_session.index(session_id)] = None
        self._version.pop(session_id, None)
        self.store.delete(session_id)

    def _busy(self, slot: int) -> bool:
        return slot in self._active or slot in self._reading

    def _idle_full_slots(self) -> list[int]:
        slots = range(self.engine.slots)
        return [s for s in slots if not self._busy(s) and self._slot_session[s] is not None and self.engine.is_full(s)]

    def _admit(self) -> None:
        """Starts waiting requests in arrival order while slots allow (a session's requests run one at a time)."""
        started = set()
        for handle in list(self._waiting):
            running = [*self._active.values(), *self._reading.values()]
            if handle.session in started or any(h.session == handle.session for h in running):
                continue
            started.add(handle.session)
            slot = self._slot_for(handle.session)
            if slot is None:
                return  # every slot is replying: wait for one to finish
            self._waiting.remove(handle)
            try:
                self._start(handle, slot)
            except Exception as error:
                log.exception("request on session %s failed", handle.session)
                self._release(handle, failed=True)
                handle.on_event(Failed(error))

    def _slot_for(self, session_id: str) -> int | None:
        """The slot holding `session_id`, after loading it into a free slot or the least recently used idle one."""
        if session_id in self._slot_session:
            return self._slot_session.index(session_id)
        idle = [s for s in range(self.engine.slots) if not self._busy(s)]
        if not idle:
            return None
        # a free slot, the lowest first (a decode step runs up to the last active slot); else the least recently used
        occupied = lambda s: self._slot_session[s] is not None
        slot = min(idle, key=lambda s: (occupied(s), self._last_used[s] if occupied(s) else s))
        previous = self._slot_session[slot]
        if previous is not None:  # offload the least recently used idle session
            self.store.put(previous, self.engine.unload(slot), self._version.get(previous, 0))
        row = self.store.take(session_id)
        self.engine.load(slot, self.engine.new_row(key_data(secrets.randbits(63))) if row is None else row)
        self._slot_session[slot] = session_id
        return slot

    def _start(self, handle: Handle, slot: int) -> None:
        request = handle.request
        handle.slot, self._last_used[slot] = slot, next(self._clock)
        self._version[handle.session] = self._version.get(handle.session, 0) + 1
        if request.seed is not None:
            self.engine.reseed(slot, key_data(request.seed))
        handle.unread = request.prompt
        if request.stop_strings:  # the text the server renders, so a reply ends exactly where its text stops
            handle.text = TextStream(self.decode, request.prompt, stops=request.stop_strings)
        self._reading[slot] = handle

    def _read_prompts(self) -> None:
        """One piece of each prompt being read (a long prompt shares the device with other sessions' tokens);
        a prompt read to its end starts its reply."""
        for slot, handle in list(self._reading.items()):
            request = handle.request
            wanted = request.prompt_logprobs is not None
            if len(handle.unread):
                piece, handle.unread = np.split(np.asarray(handle.unread), [self.engine.piece_tokens(wanted)])
                handle.scored.append(self.engine.prefill(slot, piece, logprobs=wanted))
            if len(handle.unread):
                continue
            del self._reading[slot]
            if wanted:
                parts = zip(*handle.scored, strict=True)
                handle.on_event(_prompt_logprobs([np.concatenate(p) for p in parts], request.prompt_logprobs))
            if request.max_tokens == 0:
                self._finish(handle, "length", active=False)
            else:
                self._active[slot] = handle

    def _step(self) -> None:
        for slot in self._active:
            if self.engine.is_full(slot):  # the window filled mid-reply: sleep before this row's next token
                self.engine.sleep(slot)
        active = np.zeros(self.engine.slots, bool)
        temperature, top_k, top_p = np.zeros(self.engine.slots), np.zeros(self.engine.slots), np.ones(self.engine.slots)
        for slot, handle in self._active.items():
            sampling = handle.request.sampling
            active[slot], temperature[slot], top_p[slot] = True, sampling.temperature, sampling.top_p
            top_k[slot] = sampling.top_k or 0
        logprobs = any(h.request.logprobs is not None for h in self._active.values())
        step = self.engine.decode(active, SlotSampling(temperature, top_k, top_p), logprobs=logprobs)
        for slot, handle in list(self._active.items()):
            token = int(step.tokens[slot])
            handle.generated.append(token)
            wanted = handle.request.logprobs
            if wanted is None:
                handle.on_event(Token(token))
            else:
                top = dict(zip(step.top_ids[slot, :wanted].tolist(), step.top[slot, :wanted].tolist(), strict=True))
                handle.on_event(Token(token, float(step.logprob[slot]), top))
            reason = self._stop_reason(handle)
            if reason is not None:
                self._finish(handle, reason)

    def _stop_reason(self, handle: Handle) -> str | None:
        request = handle.request
        if handle.generated[-1] in request.stop_tokens:
            return "stop"
        if handle.text is not None:
            handle.text.push(handle.generated[-1])
            if handle.text.stopped:
                return "stop"
        return "length" if len(handle.generated) >= request.max_tokens else None

    def _finish(self, handle: Handle, reason: str, *, active: bool = True, prompt_read: bool = True) -> None:
        """Ends a reply: reports it finished once the session's new state is safe (on disk with a state dir)."""
        if active and handle.slot is not None:
            del self._active[handle.slot]
        finished = Finished(reason, len(handle.request.prompt) if prompt_read else 0, len(handle.generated))
        durable = prompt_read and handle.slot is not None and not handle.one_off and self.store.durable
        row = self.engine.unload(handle.slot) if durable else None
        self._release(handle)
        if row is None:
            handle.on_event(finished)
        else:  # reported finished once the state is on disk
            then = lambda error: handle.on_event(finished if error is None else Failed(error))
            self.store.save(handle.session, row, self._version[handle.session], then)

    def _release(self, handle: Handle, failed: bool = False) -> None:
        """Updates the session's counters; a one-off session's slot is freed."""
        with self._lock:
            session = self._sessions.get(handle.session)
            if session is not None:
                session.queued -= 1
                slot = handle.slot
                session.consumed = int(self.engine.consumed[slot]) if slot is not None else session.consumed
                if failed or handle.request.max_tokens > len(handle.generated):  # fewer tokens than reserved
                    session.committed = session.consumed + sum(
                        len(h.request.prompt) + h.request.max_tokens
                        for h in self._waiting
                        if h.session == handle.session
                    )
            if handle.one_off:
                self._sessions.pop(handle.session, None)
        if handle.one_off and handle.slot is not None:
            self._slot_session[handle.slot] = None


def _prompt_logprobs(scored, alternatives: int) -> PromptLogprobs:
    """The event from the engine's arrays (token, top_ids, top): None where a token has no context."""
    token_logprobs, top_ids, top_values = scored
    tokens = [None if np.isnan(v) else float(v) for v in token_logprobs]
    top = [
        None if token is None else dict(zip(ids[:alternatives].tolist(), values[:alternatives].tolist(), strict=True))
        for token, ids, values in zip(tokens, top_ids, top_values, strict=True)
    ]
    return PromptLogprobs(tokens, top)
