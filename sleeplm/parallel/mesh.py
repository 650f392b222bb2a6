"""Sharding across devices with `jax.sharding`: a Mesh over the named axes (`sleeplm.parallel.axes.MESH_AXES`), and
the shardings of params, optimizer state, batches and the sleep state from the logical axes that parameters and
caches declare and the rules that map them to mesh axes (`sleeplm.parallel.axes`). The xla path runs under GSPMD: jit
with in/out shardings, traced with the rules in force so activation constraints and per-shard kernels follow them."""

from __future__ import annotations

import dataclasses
import math

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from sleeplm.config import Config
from sleeplm.core.parameters import init_params, param_logical_axes
from sleeplm.core.state import SleepState
from sleeplm.model.kinds import mixer_kind
from sleeplm.parallel.axes import MESH_AXES, LogicalAxes, Rules, logical_to_spec, rules_named


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


def _names(path) -> tuple[str, ...]:
    return tuple(str(getattr(key, "key", getattr(key, "name", key))) for key in path)


def _axis_size(mesh: Mesh, mesh_axes) -> int:
    mesh_axes = (mesh_axes,) if isinstance(mesh_axes, str) else mesh_axes or ()
    return math.prod(mesh.shape[a] for a in mesh_axes)


def check_divisible(
    config: Config, batch_size: int, mesh: Mesh, rules: Rules, eval_batch_size: int | None = None
) -> None:
    """Fails early, naming the model field, when the mesh cannot split what the rules ask it to split."""
    m = config.model
    batches = {"train.batch_size": batch_size} | ({"run.eval_batch_size": eval_batch_size} if eval_batch_size else {})
    wanted = {"batch": batches, "embed": {"model.d_model": m.d_model}, "optimizer_embed": {"model.d_model": m.d_model}}
    for kind in dict.fromkeys(m.layers):
        for logical, fields in mixer_kind(kind).split_sizes(m).items():
            wanted.setdefault(logical, {}).update(fields)
    wanted.setdefault("mlp", {})["model.mlp_dim"] = m.mlp_dim
    for logical, fields in wanted.items():
        size = _axis_size(mesh, rules.get(logical))
        for field, value in fields.items():
            if value % size:
                raise ValueError(
                    f"mesh {dict(mesh.shape)} does not divide the model: {field}={value} is split over "
                    f"{rules.get(logical)} = {size} devices (logical axis {logical!r})"
                )


def effective_rules(config: Config, mesh: Mesh, rules: Rules) -> dict:
    """The vocabulary is sharded only when the mesh divides it (small task vocabularies are replicated)."""
    rules = dict(rules)
    if config.model.vocab_size % _axis_size(mesh, rules.get("vocab")):
        rules["vocab"] = None
    return rules


def _is_axes(x) -> bool:
    return isinstance(x, LogicalAxes)


def train_state_shardings(abstract, mesh: Mesh, rules: Rules, config: Config):
    """Shardings of the train state: each parameter by the logical axes it was created with; each optimizer-state
    leaf that mirrors a parameter (the same path below a 'params' key) like that parameter, its embed dim following
    "optimizer_embed" where the rules have it; counters and other leaves replicated."""
    optimizer_rules = dict(rules, embed=rules.get("optimizer_embed", rules.get("embed")))
    flat = jax.tree_util.tree_leaves_with_path(param_logical_axes(config), is_leaf=_is_axes)
    axes_by_path = {_names(path)[1:]: axes for path, axes in flat}  # below the 'params' collection

    def sharding(path, leaf):
        names = _names(path)
        if "params" in names and leaf.ndim:
            below = names[len(names) - names[::-1].index("params") :]
            axes = axes_by_path.get(below)
            if axes is not None and len(axes) == leaf.ndim:
                return NamedSharding(mesh, logical_to_spec(axes, rules if names[0] == "params" else optimizer_rules))
        return NamedSharding(mesh, P())

    return jax.tree_util.tree_map_with_path(sharding, abstract)


def param_shardings(config: Config, mesh: Mesh, rules: str | Rules = "fsdp+tp") -> dict:
    """The params tree's shardings on `mesh`, as a sharded run holds them (after checking the mesh divides the
    model, naming the field when it does not)."""
    rules = rules_named(rules) if isinstance(rules, str) else rules
    check_divisible(config, _axis_size(mesh, rules.get("batch")), mesh, rules)
    abstract = jax.eval_shape(lambda key: init_params(key, config), jax.random.key(0))
    return train_state_shardings(abstract, mesh, effective_rules(config, mesh, rules), config)


def batch_sharding(mesh: Mesh, rules: Rules) -> NamedSharding:
    return NamedSharding(mesh, P(rules["batch"]))


def sleep_state_shardings(state: SleepState, mesh: Mesh, rules: Rules, config: Config) -> SleepState:
    """Each block's cache by the logical axes its mixer kind gives it; the hidden states and each row's position and
    flags over the batch axes."""
    caches = tuple(
        mixer_kind(kind).cache_axes(cache) for kind, cache in zip(config.model.layers, state.caches, strict=True)
    )
    caches = jax.tree.map(lambda axes: NamedSharding(mesh, logical_to_spec(axes, rules)), caches, is_leaf=_is_axes)
    rows = NamedSharding(mesh, P(rules["batch"]))
    return SleepState(caches, rows, rows, rows)
