"""Token ids to text as a reply is generated: only text that is final is released, so a streamed reply and the
whole reply are the same text.

Each token's text is decoded in the context of the tokens before it (decode(before + [t]) minus decode(before), as
vLLM does), since a codec need not decode token by token: the whitespace codec joins tokens with spaces, a byte-level
BPE splits characters across tokens. Text is held back while it ends in U+FFFD (a token that stops inside a UTF-8
character) and while its end could begin a stop string; nothing from the first stop string on is released.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

INCOMPLETE = "\ufffd"
CONTEXT = 4  # prompt tokens decoded before a reply's first token, so it gets its leading space as in the whole text


class TextStream:
    """Token ids -> text. `prompt`: the ids before the reply; with `echo` they begin `text` (their offsets in
    `prompt_offsets`), else its last CONTEXT ids are decoded as context only. `stops`: stop strings, searched for
    in the reply."""

    def __init__(self, decode: Callable[[Sequence[int]], str], prompt=(), *, echo: bool = False, stops=()) -> None:
        self._decode = decode
        context = [] if echo else [int(i) for i in list(prompt)[-CONTEXT:]]
        self._ids = [] if decode(context).endswith(INCOMPLETE) else context  # a split character: no context
        self._prefix = 0  # ids[prefix:read] are decoded again as the context of the next token
        self._read = len(self._ids)  # ids before read are in `text`
        self._stops = tuple(stops)
        self._released = 0
        self.text = ""
        self.stopped = False  # a stop string was found: `text` ends before it
        self._reply_start = None
        self.prompt_offsets = [self.push(token) for token in prompt] if echo else []
        self._reply_start = len(self.text)  # where stop strings are searched from

    def push(self, token: int) -> int:
        """Adds a token of the reply; returns its offset in `text` (where the text decoded so far ends)."""
        offset = len(self.text)
        if not self.stopped:
            self._ids.append(int(token))
            self._extend(final=False)
        return min(offset, len(self.text))

    def release(self, final: bool = False) -> str:
        """The text that became final since the last call; `final`: the reply ended, release everything kept."""
        if final and not self.stopped:
            self._extend(final=True)
        end = len(self.text) if final or self.stopped else len(self.text) - self._held()
        piece = self.text[self._released : end]
        self._released = max(self._released, end)
        return piece

    def _extend(self, final: bool) -> None:
        before = self._decode(self._ids[self._prefix : self._read])
        after = self._decode(self._ids[self._prefix :])
        if len(after) <= len(before) or not after.startswith(before):
            if not final:
                return  # nothing decodes yet, or the context decodes differently: wait for more tokens
            before = ""
            after = self._decode(self._ids[self._read :])
        elif after.endswith(INCOMPLETE) and not final:
            return
        searched = len(self.text)
        self.text += after[len(before) :]
        self._prefix, self._read = self._read, len(self._ids)
        self._find_stop(searched)

    def _find_stop(self, searched: int) -> None:
        if self._reply_start is None or not self._stops:
            return
        start = max(self._reply_start, searched - max(len(s) for s in self._stops) + 1)
        found = [i for i in (self.text.find(s, start) for s in self._stops) if i >= 0]
        if found:
            self.text = self.text[: min(found)]
            self.stopped = True

    def _held(self) -> int:
        """How many characters at the end of the reply's text could begin a stop string."""
        start = len(self.text) if self._reply_start is None else self._reply_start
        tail = self.text[max(start, self._released) :]
        for size in range(min(len(tail), max((len(s) for s in self._stops), default=1) - 1), 0, -1):
            if any(s.startswith(tail[-size:]) for s in self._stops):
                return size
        return 0
