"""Frozen, hashable configuration (usable as a static argument of `jax.jit`).

Every field is validated at construction; an invalid value raises `ValueError` naming the field, the value
and what is allowed, so a bad config fails before anything is traced or compiled.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

LAYER_KINDS = ("attn", "gdn")
EVICTION_MODES = ("hard", "sliding", "none")
DTYPES = ("float32", "bfloat16")
GDN_IMPLEMENTATIONS = ("auto", "reference", "xla", "pallas")


def _fail(field: str, value: object, allowed: str) -> None:
    raise ValueError(f"{field}={value!r} is invalid: {allowed}")


def _positive_int(field: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        _fail(field, value, "must be a positive integer")


def check_positive_ints(config: object, names: tuple[str, ...], prefix: str = "") -> None:
    """Raises ValueError naming the first of `names` on `config` that is not a positive integer."""
    for name in names:
        _positive_int(prefix + name, getattr(config, name))


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The hybrid block stack of SPEC §2.

    `layers` lists the mixer of each block in order ("attn" or "gdn"); attention uses `num_heads` query heads of
    `head_dim` (default d_model // num_heads) and `num_kv_heads` key/value heads (GQA when fewer); Gated DeltaNet
    uses `gdn_heads` heads with key dim `gdn_head_dim_k` and value dim `gdn_head_dim_v` (default head_dim).
    """

    vocab_size: int = 32
    d_model: int = 128
    layers: tuple[str, ...] = ("attn", "gdn", "attn", "gdn")
    num_heads: int = 4
    num_kv_heads: int | None = None
    head_dim: int | None = None
    gdn_heads: int | None = None
    gdn_head_dim_k: int | None = None
    gdn_head_dim_v: int | None = None
    mlp_dim: int | None = None
    short_conv: bool = True
    conv_width: int = 4
    rope_theta: float = 10_000.0
    norm_eps: float = 1e-6
    dtype: Literal["float32", "bfloat16"] = "float32"
    gdn_implementation: str = "auto"
    gdn_chunk_size: int = 64

    def __post_init__(self) -> None:
        check_positive_ints(self, ("vocab_size", "d_model", "num_heads", "conv_width", "gdn_chunk_size"))
        for name in ("num_kv_heads", "head_dim", "gdn_heads", "gdn_head_dim_k", "gdn_head_dim_v", "mlp_dim"):
            value = getattr(self, name)
            if value is not None:
                _positive_int(name, value)
        if not isinstance(self.layers, tuple) or not self.layers:
            _fail("layers", self.layers, f"must be a non-empty tuple of {LAYER_KINDS}")
        for i, kind in enumerate(self.layers):
            if kind not in LAYER_KINDS:
                _fail(f"layers[{i}]", kind, f"allowed mixers are {LAYER_KINDS}")
        if self.head_dim is None and self.d_model % self.num_heads:
            _fail("num_heads", self.num_heads, f"must divide d_model={self.d_model} (or set head_dim)")
        if self.attn_head_dim % 2:
            _fail("head_dim", self.attn_head_dim, "must be even (RoPE rotates pairs of dims)")
        if self.num_heads % self.kv_heads:
            _fail("num_kv_heads", self.num_kv_heads, f"must divide num_heads={self.num_heads}")
        if self.dtype not in DTYPES:
            _fail("dtype", self.dtype, f"allowed dtypes are {DTYPES}")
        if self.gdn_implementation not in GDN_IMPLEMENTATIONS:
            _fail("gdn_implementation", self.gdn_implementation, f"allowed are {GDN_IMPLEMENTATIONS}")
        if not self.rope_theta > 0:
            _fail("rope_theta", self.rope_theta, "must be > 0")
        if not self.norm_eps > 0:
            _fail("norm_eps", self.norm_eps, "must be > 0")

    @property
    def attn_head_dim(self) -> int:
        return self.head_dim or self.d_model // self.num_heads

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def gdn_num_heads(self) -> int:
        return self.gdn_heads or self.num_heads

    @property
    def gdn_dim_k(self) -> int:
        return self.gdn_head_dim_k or self.attn_head_dim

    @property
    def gdn_dim_v(self) -> int:
        return self.gdn_head_dim_v or self.attn_head_dim

    @property
    def hidden_dim(self) -> int:
        return self.mlp_dim or 4 * self.d_model


@dataclasses.dataclass(frozen=True)
class SleepConfig:
    """The wake/sleep process of SPEC §3.

    `window` is L (tokens per window), `passes` is N (all passes over a slept window: N=1 means no sleep),
    `eviction` is "hard" (KV cleared after each slept window), "sliding" (sliding-window attention of width L), or
    "none": the no-eviction baseline, where the whole sequence is one window (full causal attention, never slept on;
    `window` then only lays out the task). "none" has no streaming state: train and evaluate it with `forward`.
    `remat` rematerialises each window pass in the backward pass (memory for compute);
    `stop_gradient_between_windows` truncates backpropagation at window boundaries (both off by default).
    """

    window: int = 24
    passes: int = 1
    eviction: Literal["hard", "sliding", "none"] = "hard"
    remat: bool = False
    stop_gradient_between_windows: bool = False

    def __post_init__(self) -> None:
        _positive_int("sleep.window", self.window)
        _positive_int("sleep.passes", self.passes)
        if self.eviction not in EVICTION_MODES:
            _fail("sleep.eviction", self.eviction, f"allowed modes are {EVICTION_MODES}")


@dataclasses.dataclass(frozen=True)
class Config:
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    sleep: SleepConfig = dataclasses.field(default_factory=SleepConfig)

    def __post_init__(self) -> None:
        if not isinstance(self.model, ModelConfig):
            _fail("model", type(self.model).__name__, "must be a ModelConfig")
        if not isinstance(self.sleep, SleepConfig):
            _fail("sleep", type(self.sleep).__name__, "must be a SleepConfig")
