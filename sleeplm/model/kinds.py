"""The registry of mixer kinds: the names `ModelConfig.layers` may use. A new kind is one `Mixer` module plus one
line here (or a `register_mixer` call in user code)."""

from __future__ import annotations

from sleeplm.model.attention import Attention
from sleeplm.model.gated_attention import GatedAttention
from sleeplm.model.gdn import GatedDeltaNet
from sleeplm.model.grouped_gdn import GroupedGatedDeltaNet
from sleeplm.model.mixer import Mixer

MIXERS: dict[str, type[Mixer]] = {
    "attn": Attention,
    "gdn": GatedDeltaNet,
    "gated_attn": GatedAttention,  # the Qwen3-Next / Qwen3.5 full-attention layer
    "grouped_gdn": GroupedGatedDeltaNet,  # the Qwen3-Next / Qwen3.5 linear-attention layer
}


def register_mixer(name: str, kind: type[Mixer]) -> None:
    """Makes `name` usable in `ModelConfig.layers`; its parameters appear under that name in each block."""
    if not (isinstance(kind, type) and issubclass(kind, Mixer)):
        raise TypeError(f"mixer kind {name!r} must be a subclass of sleeplm.model.mixer.Mixer, got {kind!r}")
    if name in MIXERS and MIXERS[name] is not kind:
        raise ValueError(f"mixer kind {name!r} is already registered (as {MIXERS[name].__name__})")
    MIXERS[name] = kind


def mixer_kind(name: str, field: str = "layers") -> type[Mixer]:
    """The kind registered as `name`; an unknown name fails naming `field` and the registered kinds."""
    if name not in MIXERS:
        raise ValueError(f"{field}={name!r} is invalid: allowed mixers are {tuple(MIXERS)}")
    return MIXERS[name]
