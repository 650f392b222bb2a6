"""Eviction modes: what happens to attention's keys and values when a window ends (docs/method.md, "Eviction").

Each mode is defined here once; `SleepConfig.eviction` names one, and the mixers' caches and the window layout of
`forward` read its properties instead of inferring the mode from shapes or rewriting the config.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Eviction:
    """`bounded`: the sequence is cut into windows of L tokens, each slept on and evicted when full and followed;
    when False the whole sequence is one window (full causal attention, never slept on). `keeps_previous_window`:
    attention keeps the last window's keys and values beside the current window's, so every query sees the last L
    positions (sliding-window attention of width L); when False a window's KV is cleared as it ends."""

    name: str
    bounded: bool
    keeps_previous_window: bool

    def window_length(self, window: int, length: int) -> int:
        """Tokens per window for a sequence of `length` tokens, given the configured window L."""
        return window if self.bounded else length


EVICTIONS: dict[str, Eviction] = {
    mode.name: mode
    for mode in (
        Eviction("hard", bounded=True, keeps_previous_window=False),
        Eviction("sliding", bounded=True, keeps_previous_window=True),
        Eviction("none", bounded=False, keeps_previous_window=False),
    )
}
