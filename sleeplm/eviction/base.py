"""The contract of an eviction mode: what attention keeps of its keys and values when a window ends
(docs/method.md, "Eviction")."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Eviction:
    """`bounded`: a window of L tokens is slept on and evicted when full and followed by more of its document; when
    False nothing is slept on or evicted, and the caches hold every token of the document (full causal attention:
    `forward` still steps through windows of L, but into caches as long as the sequence). `keeps_previous_window`:
    attention keeps the last window's keys and values beside the current window's, so every query sees the last L
    positions (sliding-window attention of width L); when False a window's KV is cleared as it ends."""

    name: str
    bounded: bool
    keeps_previous_window: bool

    def capacity(self, window: int, requested: int | None) -> int:
        """Cache slots per row: the configured window L, or, without eviction, the most tokens a row will hold."""
        return window if self.bounded else requested
