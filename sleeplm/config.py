"""Frozen, hashable configuration (usable as a static argument of `jax.jit`).

Every field is validated at construction; an invalid value raises `ValueError` naming the field, the value
and what is allowed, so a bad config fails before anything is traced or compiled.
"""

from __future__ import annotations

import dataclasses
import math

from sleeplm.eviction import Eviction
from sleeplm.eviction import eviction_mode as parse_eviction

DTYPES = ("float32", "bfloat16")


def _fail(field: str, value: object, allowed: str) -> None:
    raise ValueError(f"{field}={value!r} is invalid: {allowed}")


def _int_at_least(field: str, value: object, low: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        _fail(field, value, "must be a positive integer" if low == 1 else f"must be an integer >= {low}")


def _positive_int(field: str, value: object) -> None:
    _int_at_least(field, value, 1)


def check_ints_at_least(config: object, lows: dict[str, int], prefix: str = "") -> None:
    """Raises ValueError naming the first field `name` of `lows` on `config` that is not an integer >= its low."""
    for name, low in lows.items():
        _int_at_least(prefix + name, getattr(config, name), low)


def check_positive_ints(config: object, names: tuple[str, ...], prefix: str = "") -> None:
    """Raises ValueError naming the first of `names` on `config` that is not a positive integer."""
    check_ints_at_least(config, dict.fromkeys(names, 1), prefix)


def check_numbers(
    config: object, names: tuple[str, ...], prefix: str = "", low: float = 0.0, strict: bool = True
) -> None:
    """Raises ValueError naming the first of `names` on `config` that is not a finite real number > `low` (>= when
    not `strict`): a string, None, a bool, NaN or an infinity from JSON or the command line fails here."""
    for name in names:
        value = getattr(config, name)
        real = isinstance(value, (int, float)) and not isinstance(value, bool)
        if (
            not real
            or (isinstance(value, float) and not math.isfinite(value))
            or not (value > low if strict else value >= low)
        ):
            _fail(prefix + name, value, f"must be a finite number {'>' if strict else '>='} {low:g}")


def check_bools(config: object, names: tuple[str, ...], prefix: str = "") -> None:
    """Raises ValueError naming the first of `names` on `config` that is not True or False."""
    for name in names:
        if not isinstance(getattr(config, name), bool):
            _fail(prefix + name, getattr(config, name), "must be True or False")


class Derived(int):
    """A size derived from other fields because it was left as None. It is the int it equals (in arithmetic,
    equality, hashing and JSON), and `dataclasses.replace` derives it again from the changed fields instead of
    keeping it, so overriding d_model or num_heads keeps the sizes that follow from them consistent."""


# How each field left as None is derived, in this order.
_DERIVED = {
    "num_kv_heads": lambda m: m.num_heads,
    "head_dim": lambda m: m.d_model // m.num_heads,
    "rotary_dim": lambda m: m.head_dim,
    "gdn_heads": lambda m: m.num_heads,
    "gdn_key_heads": lambda m: m.gdn_heads,
    "gdn_head_dim_k": lambda m: m.head_dim,
    "gdn_head_dim_v": lambda m: m.head_dim,
    "mlp_dim": lambda m: 4 * m.d_model,
}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The hybrid block stack (docs/method.md, "The model").

    `layers` names the mixer of each block in order, each a kind registered in `sleeplm.model.kinds` ("attn",
    "gdn", "gated_attn", "grouped_gdn", or one registered by the user). Attention uses `num_heads` query heads of
    `head_dim` (default d_model // num_heads), RoPE on the first `rotary_dim` dims of each (default head_dim), and
    `num_kv_heads` key/value heads (default num_heads; GQA when fewer); Gated DeltaNet uses `gdn_heads` (value)
    heads (default num_heads) with key dim `gdn_head_dim_k` and value dim `gdn_head_dim_v` (default head_dim), and
    "grouped_gdn" `gdn_key_heads` query/key heads (default gdn_heads), each shared by gdn_heads / gdn_key_heads
    value heads; the MLP's hidden size is `mlp_dim` (default 4 d_model). `gdn_implementation` is a name of
    `sleeplm.ops.implementation_names()`. The mixer kinds and the implementation are looked up in their registries
    where the config is first used (`sleeplm.core.checks.check_config`), not here: a config checks its own fields.

    `zero_centered_norm`: every RMSNorm of the stack (block norms, final norm, attention's q/k norms) scales by
    (1 + w) with w initialised to 0, as the Qwen3-Next family stores it (the GDN output norm keeps its plain scale).
    `tie_embeddings`: the head reads the embedding table (logits = h E^T) and has no parameter of its own.
    `inserted_blocks`: indices of blocks a retrofit inserted (`sleeplm.training.retrofit`): each is a mixer without an
    MLP, and its parameters are declared new (`train.trainable="new"` trains only them).
    """

    vocab_size: int = 32
    d_model: int = 128
    layers: tuple[str, ...] = ("attn", "gdn", "attn", "gdn")
    num_heads: int = 4
    num_kv_heads: int | None = None
    head_dim: int | None = None
    rotary_dim: int | None = None
    gdn_heads: int | None = None
    gdn_key_heads: int | None = None
    gdn_head_dim_k: int | None = None
    gdn_head_dim_v: int | None = None
    mlp_dim: int | None = None
    short_conv: bool = True
    conv_width: int = 4
    rope_theta: float = 10_000.0
    norm_eps: float = 1e-6
    zero_centered_norm: bool = False
    tie_embeddings: bool = False
    inserted_blocks: tuple[int, ...] = ()
    dtype: str = "float32"
    gdn_implementation: str = "auto"
    gdn_chunk_size: int = 64

    def __post_init__(self) -> None:
        check_positive_ints(self, ("vocab_size", "d_model", "num_heads", "conv_width", "gdn_chunk_size"))
        derive = [name for name in _DERIVED if getattr(self, name) is None or isinstance(getattr(self, name), Derived)]
        check_positive_ints(self, tuple(name for name in _DERIVED if name not in derive))
        if "head_dim" in derive and self.d_model % self.num_heads:
            _fail("num_heads", self.num_heads, f"must divide d_model={self.d_model} (or set head_dim)")
        for name in derive:
            object.__setattr__(self, name, Derived(_DERIVED[name](self)))
        if isinstance(self.layers, list):  # from JSON
            object.__setattr__(self, "layers", tuple(self.layers))
        if not isinstance(self.layers, tuple) or not self.layers:
            _fail("layers", self.layers, "must be a non-empty tuple of mixer kinds")
        self._check_inserted_blocks()
        check_bools(self, ("short_conv", "zero_centered_norm", "tie_embeddings"))
        if not all(isinstance(kind, str) for kind in self.layers):
            _fail("layers", self.layers, "must be a non-empty tuple of mixer kinds")
        if not isinstance(self.dtype, str) or self.dtype not in DTYPES:
            _fail("dtype", self.dtype, f"allowed dtypes are {DTYPES}")
        if not isinstance(self.gdn_implementation, str):
            _fail(
                "gdn_implementation", self.gdn_implementation, "must be the name of a gated-delta-rule implementation"
            )
        check_numbers(self, ("rope_theta", "norm_eps"))

    def _check_inserted_blocks(self) -> None:
        """`inserted_blocks` as a sorted tuple of distinct block indices (JSON and the command line give lists and
        strings)."""
        try:
            blocks = tuple(int(i) for i in self.inserted_blocks)
        except (TypeError, ValueError):
            _fail("inserted_blocks", self.inserted_blocks, "must be block indices")
        if len(set(blocks)) != len(blocks) or not all(0 <= i < len(self.layers) for i in blocks):
            _fail("inserted_blocks", self.inserted_blocks, f"must be distinct indices of the {len(self.layers)} blocks")
        object.__setattr__(self, "inserted_blocks", tuple(sorted(blocks)))


@dataclasses.dataclass(frozen=True)
class SleepConfig:
    """The wake/sleep process (docs/method.md, "Windows, wake and sleep").

    `window` is L (tokens per window), `passes` is N (all passes over a slept window: N=1 means no sleep),
    `eviction` names a mode of `sleeplm.eviction.EVICTIONS`: "hard" (KV cleared after each slept window), "sliding"
    (sliding-window attention of width L), "sinks:S" (sliding plus the document's first S tokens, StreamingLLM;
    "sinks" alone keeps 4), or "none": the no-eviction baseline, where the caches keep every token
    (full causal attention, nothing slept on; `window` then only lays out the task and the steps of the scan).
    `loop_layers` (start, stop): the contiguous blocks [start, stop) that passes 2..N re-run, each pass feeding
    those blocks' previous output back as their input; the blocks before and after them run in the wake pass only
    (None: every block, the method as the paper states it; docs/method.md, "Choices where the paper is silent").
    `remat` rematerialises each window pass in the backward pass (memory for compute);
    `stop_gradient_between_windows` truncates backpropagation at window boundaries (both off by default).
    """

    window: int = 24
    passes: int = 1
    eviction: str = "hard"
    loop_layers: tuple[int, int] | None = None
    remat: bool = False
    stop_gradient_between_windows: bool = False

    def __post_init__(self) -> None:
        _positive_int("sleep.window", self.window)
        _positive_int("sleep.passes", self.passes)
        check_bools(self, ("remat", "stop_gradient_between_windows"), prefix="sleep.")
        if not isinstance(self.eviction, str):
            _fail("sleep.eviction", self.eviction, "must be the name of an eviction mode (a string)")
        mode = parse_eviction(self.eviction)  # an unknown name or argument fails naming the field
        try:
            mode.check(self.window)
        except ValueError as error:
            _fail("sleep.eviction", self.eviction, str(error))
        if self.loop_layers is not None:  # from JSON or the command line: a list, or strings
            try:
                start, stop = (int(i) for i in self.loop_layers)
            except (TypeError, ValueError):
                _fail("sleep.loop_layers", self.loop_layers, "must be two block indices (start, stop)")
            if not 0 <= start < stop:
                _fail("sleep.loop_layers", self.loop_layers, "must satisfy 0 <= start < stop")
            object.__setattr__(self, "loop_layers", (start, stop))

    @property
    def eviction_mode(self) -> Eviction:
        """The `Eviction` that `eviction` names ("name" or "name:ARG")."""
        return parse_eviction(self.eviction)


@dataclasses.dataclass(frozen=True)
class Config:
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    sleep: SleepConfig = dataclasses.field(default_factory=SleepConfig)

    def __post_init__(self) -> None:
        if not isinstance(self.model, ModelConfig):
            _fail("model", type(self.model).__name__, "must be a ModelConfig")
        if not isinstance(self.sleep, SleepConfig):
            _fail("sleep", type(self.sleep).__name__, "must be a SleepConfig")
        blocks = len(self.model.layers)
        if self.sleep.loop_layers is not None and self.sleep.loop_layers[1] > blocks:
            _fail("sleep.loop_layers", self.sleep.loop_layers, f"must lie within the model's {blocks} blocks")

    @property
    def looped_blocks(self) -> tuple[int, int]:
        """(start, stop): the blocks that sleep passes re-run (every block unless `sleep.loop_layers` says)."""
        return self.sleep.loop_layers or (0, len(self.model.layers))
