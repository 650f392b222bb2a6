"""The registry of eviction modes: the names `SleepConfig.eviction` may use, as "name" or "name:ARG" (e.g.
"sinks:4"). A mode is defined once, in its own module, and registered here with one line (or by
`register_eviction` in user code); caches, `forward` and the streaming path call its hooks, never read its name.
This package imports nothing else from sleeplm (the config imports it)."""

from __future__ import annotations

from sleeplm.eviction.base import Eviction, Seen
from sleeplm.eviction.modes import Hard, NoEviction, Sliding
from sleeplm.eviction.sinks import Sinks

EVICTIONS: dict[str, Eviction] = {}


def register_eviction(mode: Eviction) -> None:
    """Makes `mode.name` (and `mode.name:ARG`, when the mode takes an argument) usable in `SleepConfig.eviction`."""
    if not isinstance(mode, Eviction):
        raise TypeError(f"eviction mode {mode!r} must be an instance of sleeplm.eviction.Eviction")
    if not mode.name or ":" in mode.name:
        raise ValueError(f"eviction mode name {mode.name!r} is invalid: must be non-empty and without ':'")
    if mode.name in EVICTIONS and EVICTIONS[mode.name] != mode:
        raise ValueError(f"eviction mode {mode.name!r} is already registered (as {EVICTIONS[mode.name]!r})")
    EVICTIONS[mode.name] = mode


def eviction_mode(text: str) -> Eviction:
    """The mode `text` names: "name", or "name:ARG" for a mode that takes an argument."""
    name, colon, argument = text.partition(":") if isinstance(text, str) else (text, "", "")
    if name not in EVICTIONS:
        raise ValueError(f"sleep.eviction={text!r} is invalid: allowed modes are {tuple(EVICTIONS)}")
    if not colon:
        return EVICTIONS[name]
    try:
        return EVICTIONS[name].with_argument(argument)
    except ValueError as error:
        raise ValueError(f"sleep.eviction={text!r} is invalid: {name!r} {error}") from None


for _mode in (Hard(), Sliding(), NoEviction()):
    register_eviction(_mode)
register_eviction(Sinks())

__all__ = ["EVICTIONS", "Eviction", "Seen", "eviction_mode", "register_eviction"]
