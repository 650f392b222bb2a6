"""The scheduler's events for one HTTP request, brought onto the event loop and turned into pieces of reply.

The scheduler calls `on_event` from its own thread; `Replies` hands each event to the request's asyncio queue with
`loop.call_soon_threadsafe`, tagged with the index of the choice (one per prompt) it belongs to. A `Choice` turns a
choice's events into `Delta`s: released text and the tokens it came from, so a streamed reply (one chunk per delta)
and a whole one (the deltas joined) are the same reply.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator, Callable, Sequence

from sleeplm.inference.scheduler import Failed, Finished, PromptLogprobs, Token
from sleeplm.inference.text import TextStream


@dataclasses.dataclass(frozen=True)
class Logprob:
    """One token of a reply with logprobs: its `id`, `text` alone, `logprob` (None: a fresh stream's first token),
    `top` alternatives {id: logprob} (None when not asked for) and `offset` in the choice's text."""

    id: int
    text: str
    logprob: float | None
    top: dict[int, float] | None
    offset: int


@dataclasses.dataclass(frozen=True)
class Delta:
    """What a choice adds at one event: `text`, the `tokens` behind it (with logprobs asked for), and once it ends
    its `finish_reason` ("stop" or "length") and token counts."""

    index: int
    text: str = ""
    tokens: tuple[Logprob, ...] = ()
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


class ReplyFailed(Exception):
    """The scheduler failed a request (`Failed`); `error` is its exception."""

    def __init__(self, error: Exception) -> None:
        super().__init__(str(error))
        self.error = error


def _with(top: dict[int, float] | None, token: int, logprob: float | None) -> dict[int, float] | None:
    """The top alternatives and the token itself, as OpenAI returns them (up to k + 1 entries)."""
    return None if top is None or logprob is None else {**top, token: logprob}


class Choice:
    """One prompt's reply. `echo`: the prompt's text comes first; `stop_tokens`: ids that end the reply without
    adding text (the scheduler stops on them); `stop_strings`: the text ends before the first one."""

    def __init__(self, index: int, decode, prompt: Sequence[int], *, echo: bool, stop_strings, stop_tokens) -> None:
        self.index, self.decode, self.prompt = index, decode, list(prompt)
        self.text = TextStream(decode, self.prompt, echo=echo, stops=stop_strings)
        self.echo, self.stop_tokens = echo, frozenset(stop_tokens)

    def start(self, prompt_logprobs: bool) -> Delta | None:
        """The echoed prompt, unless it comes with its logprobs (then at `PromptLogprobs`)."""
        return Delta(self.index, self.text.release()) if self.echo and not prompt_logprobs else None

    def prompt_logprobs(self, event) -> Delta:
        """The echoed prompt with its logprobs (asked for only with echo)."""
        tokens = tuple(
            Logprob(token, self.decode([token]), logprob, _with(top, token, logprob), offset)
            for token, logprob, top, offset in zip(
                self.prompt, event.token_logprobs, event.top, self.text.prompt_offsets, strict=True
            )
        )
        return Delta(self.index, self.text.release(), tokens)

    def token(self, event) -> Delta:
        if self.text.stopped:
            return Delta(self.index)
        offset = len(self.text.text) if event.id in self.stop_tokens else self.text.push(event.id)
        entry = Logprob(
            event.id, self.decode([event.id]), event.logprob, _with(event.top, event.id, event.logprob), offset
        )
        return Delta(self.index, self.text.release(), (entry,))

    def finished(self, event) -> Delta:
        reason = "stop" if self.text.stopped else event.reason
        text = self.text.release(final=True)
        return Delta(self.index, text, (), reason, event.prompt_tokens, event.completion_tokens)


class Replies:
    """The events of a request's choices on the event loop: `on_event(index)` is the callback to give the
    scheduler for choice `index`; `deltas()` yields `Delta`s until every choice has finished, and `finished` holds
    each choice's last one. `choices` are set once the scheduler accepted the prompts (so they are valid ids);
    events arriving before wait in the queue. `prompt_logprobs`: the requests ask for the prompt's logprobs."""

    def __init__(self, prompt_logprobs: bool = False) -> None:
        self.prompt_logprobs = prompt_logprobs
        self.choices: list[Choice] = []
        self.finished: list[Delta] = []
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()

    def on_event(self, index: int) -> Callable[[object], None]:
        def deliver(event) -> None:  # on the scheduler's thread
            with contextlib.suppress(RuntimeError):  # RuntimeError: the loop closed, nobody listens any more
                self.loop.call_soon_threadsafe(self.queue.put_nowait, (index, event))

        return deliver

    async def deltas(self) -> AsyncIterator[Delta]:
        for choice in self.choices:
            start = choice.start(self.prompt_logprobs)
            if start is not None:
                yield start
        while len(self.finished) < len(self.choices):
            index, event = await self.queue.get()
            choice = self.choices[index]
            if isinstance(event, Token):
                yield choice.token(event)
            elif isinstance(event, PromptLogprobs):
                yield choice.prompt_logprobs(event)
            elif isinstance(event, Finished):
                self.finished.append(choice.finished(event))
                yield self.finished[-1]
            elif isinstance(event, Failed):
                raise ReplyFailed(event.error)
