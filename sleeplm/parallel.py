"""Sharding across devices with `jax.sharding`: a Mesh over the named axes (data, fsdp, tensor), logical-axis rules
mapping parameter and activation dims to mesh axes (in the spirit of maxtext's rule files), and the shardings of
params, optimizer state, batches and the sleep state. The xla path runs under GSPMD: jit with in/out shardings."""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from sleeplm.config import Config
from sleeplm.constraints import BATCH_AXES
from sleeplm.state import AttentionCache, FastWeightState, SleepState
from sleeplm.train import TrainConfig, TrainState, eval_step, init_train_state, train_step

MESH_AXES = ("data", "fsdp", "tensor")
BATCH = BATCH_AXES

# Logical dims -> mesh axes. "fsdp+tp" is the general rule set: on a mesh axis of size 1 its entries are no-ops.
# "optimizer_embed" shards the optimizer state's embed dim where the params' is not (ZeRO-1): under "dp" each
# device then updates 1/n of every matrix instead of repeating the whole (Muon) update, and the new params are
# all-gathered. Without it the optimizer cost 5x its single-device time on 8 fake CPU devices (benchmarks/RESULTS.md).
RULES: dict[str, dict[str, str | tuple[str, ...] | None]] = {
    "dp": {"batch": BATCH, "embed": None, "heads": None, "mlp": None, "vocab": None, "optimizer_embed": BATCH},
    "fsdp": {"batch": BATCH, "embed": "fsdp", "heads": None, "mlp": None, "vocab": None},
    "fsdp+tp": {"batch": BATCH, "embed": "fsdp", "heads": "tensor", "mlp": "tensor", "vocab": "tensor"},
}


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Devices per mesh axis; one axis may be -1, meaning the devices left over."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1

    @classmethod
    def parse(cls, text: str) -> MeshConfig:
        """ "data=2,fsdp=2,tensor=2" -> MeshConfig(2, 2, 2) (unnamed axes keep their defaults)."""
        values = {}
        for part in filter(None, (p.strip() for p in text.split(","))):
            name, _, value = part.partition("=")
            if name not in MESH_AXES or not value.lstrip("-").isdigit():
                raise ValueError(f"mesh entry {part!r} is invalid: write AXIS=INT with AXIS in {MESH_AXES}")
            values[name] = int(value)
        return cls(**values)

    def shape(self, num_devices: int) -> tuple[int, int, int]:
        sizes = [self.data, self.fsdp, self.tensor]
        if sum(s == -1 for s in sizes) > 1 or any(s == 0 or s < -1 for s in sizes):
            raise ValueError(f"mesh {self} is invalid: sizes must be positive, with at most one -1")
        known = math.prod(s for s in sizes if s != -1)
        if -1 in sizes:
            if num_devices % known:
                raise ValueError(f"mesh {self}: {known} does not divide the {num_devices} devices")
            sizes[sizes.index(-1)] = num_devices // known
        if math.prod(sizes) != num_devices:
            raise ValueError(
                f"mesh {dict(zip(MESH_AXES, sizes, strict=True))} needs {math.prod(sizes)} devices, have {num_devices}"
            )
        return tuple(sizes)


def make_mesh(mesh_config: MeshConfig, devices: list | None = None) -> Mesh:
    devices = jax.devices() if devices is None else list(devices)
    return Mesh(np.asarray(devices).reshape(mesh_config.shape(len(devices))), MESH_AXES)


def _names(path) -> list[str]:
    return [str(getattr(key, "key", getattr(key, "name", key))) for key in path]


def param_logical_axes(names: list[str], ndim: int) -> tuple[str | None, ...]:
    """Logical dims of the parameter at `names` (its path inside the params tree)."""
    layer, leaf = (names[-2] if len(names) > 1 else ""), names[-1]
    if layer == "embedding":  # a gather from a vocab-sharded table would be replicated first: shard embed only
        return (None, "embed")
    if layer == "head":
        return ("embed", "vocab")
    if leaf == "kernel" and "mlp" in names:
        return ("mlp", "embed") if layer == "down" else ("embed", "mlp")
    if leaf == "kernel" and ("attn" in names or "gdn" in names):
        if layer == "o":
            return ("heads", "embed")
        if layer in ("q", "k", "v", "gate"):
            return ("embed", "heads")
        return ("embed", None)  # the per-head gates a, b: tiny, replicated over heads
    return (None,) * ndim  # norms, decay parameters, short-convolution taps: small, replicated


def _spec(axes: tuple[str | None, ...], rules: Mapping) -> P:
    return P(*(rules.get(a) if a else None for a in axes))


def _axis_size(mesh: Mesh, mesh_axes) -> int:
    mesh_axes = (mesh_axes,) if isinstance(mesh_axes, str) else mesh_axes or ()
    return math.prod(mesh.shape[a] for a in mesh_axes)


def check_divisible(
    config: Config, batch_size: int, mesh: Mesh, rules: Mapping, eval_batch_size: int | None = None
) -> None:
    """Fails early, naming the model field, when the mesh cannot split what the rules ask it to split."""
    m = config.model
    batches = {"train.batch_size": batch_size} | ({"run.eval_batch_size": eval_batch_size} if eval_batch_size else {})
    wanted = {
        "batch": batches,
        "embed": {"model.d_model": m.d_model},
        "optimizer_embed": {"model.d_model": m.d_model},
        "heads": {"model.num_heads": m.num_heads, "model.num_kv_heads": m.kv_heads, "model.gdn_heads": m.gdn_num_heads},
        "mlp": {"model.mlp_dim": m.hidden_dim},
    }
    for logical, fields in wanted.items():
        size = _axis_size(mesh, rules.get(logical))
        for field, value in fields.items():
            if value % size:
                raise ValueError(
                    f"mesh {dict(mesh.shape)} does not divide the model: {field}={value} is split over "
                    f"{rules.get(logical)} = {size} devices (logical axis {logical!r})"
                )


def _effective_rules(config: Config, mesh: Mesh, rules: Mapping) -> dict:
    """The vocabulary is sharded only when the mesh divides it (small task vocabularies are replicated)."""
    rules = dict(rules)
    if config.model.vocab_size % _axis_size(mesh, rules.get("vocab")):
        rules["vocab"] = None
    return rules


def train_state_shardings(abstract: TrainState, mesh: Mesh, rules: Mapping) -> TrainState:
    """Shardings for params and for every optimizer-state leaf that mirrors a parameter (same path below
    'params', same rank; its embed dim follows "optimizer_embed" where the rules have it); counters and other
    leaves are replicated."""
    optimizer_rules = dict(rules, embed=rules.get("optimizer_embed", rules.get("embed")))

    def sharding(path, leaf):
        names = _names(path)
        if "params" in names and leaf.ndim:
            below = names[len(names) - names[::-1].index("params") :]
            axes = param_logical_axes(below, leaf.ndim)
            if len(axes) == leaf.ndim:
                return NamedSharding(mesh, _spec(axes, rules if names[0] == "params" else optimizer_rules))
        return NamedSharding(mesh, P())

    return jax.tree_util.tree_map_with_path(sharding, abstract)


def batch_sharding(mesh: Mesh, rules: Mapping) -> NamedSharding:
    return NamedSharding(mesh, P(rules["batch"]))


def sleep_state_shardings(state: SleepState, mesh: Mesh, rules: Mapping) -> SleepState:
    """KV caches over (batch, heads), fast weights over (batch, heads), the rest over batch; scalars replicated."""
    batch, heads = rules["batch"], rules.get("heads")

    def layer(cache):
        if isinstance(cache, AttentionCache):
            return jax.tree.map(lambda _: NamedSharding(mesh, P(batch, None, heads, None)), cache)
        return FastWeightState(
            NamedSharding(mesh, P(batch, heads, None, None)),
            None if cache.conv is None else NamedSharding(mesh, P(batch)),
        )

    replicated = NamedSharding(mesh, P())
    return SleepState(tuple(layer(c) for c in state.layers), NamedSharding(mesh, P(batch)), replicated, replicated)


@dataclasses.dataclass(frozen=True)
class ShardedTraining:
    """Sharded init and train step of one experiment on one mesh."""

    mesh: Mesh
    rules: dict
    config: Config
    train: TrainConfig

    @classmethod
    def create(
        cls, config: Config, train: TrainConfig, mesh: Mesh, rules: str | Mapping = "fsdp+tp", eval_batch_size=None
    ):
        if isinstance(rules, str):
            if rules not in RULES:
                raise ValueError(f"rules={rules!r} is unknown: choose one of {sorted(RULES)}")
            rules = RULES[rules]
        check_divisible(config, train.batch_size, mesh, rules, eval_batch_size)
        return cls(mesh, _effective_rules(config, mesh, rules), config, train)

    @functools.cached_property
    def state_shardings(self) -> TrainState:
        abstract = jax.eval_shape(lambda key: init_train_state(key, self.config, self.train), jax.random.key(0))
        return train_state_shardings(abstract, self.mesh, self.rules)

    def init(self, key: jax.Array) -> TrainState:
        """The train state created directly in its sharded layout (never whole on one device)."""
        init = functools.partial(init_train_state, config=self.config, train=self.train)
        with jax.set_mesh(self.mesh):
            return jax.jit(init, out_shardings=self.state_shardings)(key)

    @functools.cached_property
    def _step(self):
        step = functools.partial(train_step, config=self.config, train=self.train)
        return jax.jit(
            step,
            in_shardings=(self.state_shardings, batch_sharding(self.mesh, self.rules)),
            out_shardings=(self.state_shardings, NamedSharding(self.mesh, P())),
            donate_argnums=(0,),
        )

    def step(self, state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        with jax.set_mesh(self.mesh):  # activates the activation constraints (sleeplm.constraints) while tracing
            return self._step(state, batch)

    @functools.cached_property
    def _eval(self):
        return jax.jit(
            functools.partial(eval_step, config=self.config),
            in_shardings=(self.state_shardings.params, batch_sharding(self.mesh, self.rules)),
            out_shardings=NamedSharding(self.mesh, P()),  # small per-example results, readable on every process
        )

    def eval(self, params, batch: dict) -> dict:
        """`train.eval_step` with params and batch sharded (the batch must divide over the batch axes).

        `batch` is the whole global batch, the same on every process (held-out sets are generated identically
        everywhere); each process places only the slices its devices hold.
        """
        sharding = batch_sharding(self.mesh, self.rules)
        batch = {
            key: jax.make_array_from_callback(np.shape(x), sharding, lambda index, x=x: np.asarray(x)[index])
            for key, x in batch.items()
        }
        with jax.set_mesh(self.mesh):
            return self._eval(params, batch)
