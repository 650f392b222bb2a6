"""The registry of eviction modes: the names `SleepConfig.eviction` may use. A mode is defined once, in its own
module; caches, `forward` and the streaming path read the mode's properties and hooks, never its name."""

from __future__ import annotations

from sleeplm.eviction.base import Eviction

EVICTIONS: dict[str, Eviction] = {
    mode.name: mode
    for mode in (
        Eviction("hard", bounded=True, keeps_previous_window=False),
        Eviction("sliding", bounded=True, keeps_previous_window=True),
        Eviction("none", bounded=False, keeps_previous_window=False),
    )
}
