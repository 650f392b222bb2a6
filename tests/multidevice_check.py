# ruff: noqa: E402
"""Run in a subprocess with 8 fake CPU devices (see test_parallel.py): sharded training, eval and streaming against
the single-device run. Prints one JSON object."""

from __future__ import annotations

from fake_devices import fake_cpu_devices

fake_cpu_devices(8)  # before jax starts

import json

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from sleeplm import Config, ModelConfig, SleepConfig, forward, init_state, wake_step
from sleeplm.data import Rule110Config, batched, make_source
from sleeplm.experiment.schema import TrainConfig
from sleeplm.parallel.mesh import MeshConfig, make_mesh, sleep_state_shardings
from sleeplm.training.sharded import ShardedTraining
from sleeplm.training.step import init_train_state, train_step

MESHES = [(8, 1, 1), (2, 4, 1), (2, 2, 2), (1, 2, 4)]


def spec(array) -> list:
    """The array's PartitionSpec as JSON: one entry per dim (None, an axis name, or a list of names)."""
    entries = list(array.sharding.spec) + [None] * (array.ndim - len(array.sharding.spec))
    return [list(e) if isinstance(e, tuple) else e for e in entries]


def relative(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.sqrt(np.mean((a - b) ** 2)) / max(np.sqrt(np.mean(b**2)), 1e-30))


def eval_and_stream(mesh, sharded, state, inputs, reference_logits) -> dict:
    config = sharded.config
    batch_sharded = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp")))
    logits = forward(state.params, jax.device_put(inputs, batch_sharded), config)
    empty = init_state(config, inputs.shape[0])
    stream_state = jax.device_put(empty, sleep_state_shardings(empty, mesh, sharded.rules, config))
    streamed, stream_state = wake_step(state.params, stream_state, inputs[:, : config.sleep.window], config)
    return {
        "logits_error": relative(logits, reference_logits),
        "stream_error": relative(streamed, reference_logits[:, : config.sleep.window]),
        "kv_spec": spec(stream_state.caches[0].k),
        "fast_weight_spec": spec(stream_state.caches[1].S),
    }


def data_parallel_zero1(config, train, batches, key, reference_params) -> dict:
    """The "dp" rules on (8, 1, 1): params replicated, optimizer state split over the batch axes (ZeRO-1)."""
    sharded = ShardedTraining.create(config, train, make_mesh(MeshConfig(8, 1, 1)), "dp")
    state = sharded.init(key)
    for batch in batches:
        state, _ = sharded.step(state, batch)
    mu_up = next(
        leaf
        for path, leaf in jax.tree_util.tree_leaves_with_path(state.opt_state)
        if "blocks_1" in jax.tree_util.keystr(path) and "'up'" in jax.tree_util.keystr(path)
    )
    params = jax.tree.leaves(jax.device_get(state.params))
    return {
        "dp_params_error": max(relative(a, b) for a, b in zip(params, jax.tree.leaves(reference_params), strict=True)),
        "dp_up_spec": spec(state.params["params"]["blocks_1"]["mlp"]["up"]["kernel"]),
        "dp_up_opt_spec": spec(mu_up),
    }


def pallas_under_mesh() -> dict:
    """The Pallas gated delta rule (interpret mode) inside a jit under a (2, 2, 2) mesh, with inputs sharded over
    batch and heads: it runs per shard through shard_map and must equal the unsharded call, values and gradients."""
    from sleeplm.ops import gated_delta_rule

    keys = jax.random.split(jax.random.key(3), 6)
    batch, length, heads, d_k, d_v = 4, 19, 4, 8, 8
    unit = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)
    args = (
        unit(jax.random.normal(keys[0], (batch, length, heads, d_k))),
        unit(jax.random.normal(keys[1], (batch, length, heads, d_k))),
        jax.random.normal(keys[2], (batch, length, heads, d_v)),
        -jax.random.uniform(keys[3], (batch, length, heads)),
        jax.random.uniform(keys[4], (batch, length, heads)),
        jax.random.normal(keys[5], (batch, heads, d_k, d_v)),
    )

    def loss(*inputs):
        out, state = gated_delta_rule(*inputs, implementation="pallas", chunk_size=8)
        return jnp.sum(jnp.sin(out)) + jnp.sum(state**2), (out, state)

    value_and_grads = jax.jit(jax.value_and_grad(loss, argnums=tuple(range(6)), has_aux=True))
    (_, expected_outputs), expected_grads = value_and_grads(*args)
    mesh = make_mesh(MeshConfig(2, 2, 2))
    sequence, gates = P(("data", "fsdp"), None, "tensor"), P(("data", "fsdp"), None, "tensor")
    specs = (sequence, sequence, sequence, gates, gates, P(("data", "fsdp"), "tensor"))
    sharded = [jax.device_put(x, NamedSharding(mesh, spec)) for x, spec in zip(args, specs, strict=True)]
    with jax.set_mesh(mesh):
        (_, outputs), grads = value_and_grads(*sharded)
    return {
        "pallas_error": max(
            relative(a, b) for a, b in zip((*outputs, *grads), (*expected_outputs, *expected_grads), strict=True)
        ),
        "pallas_grad_spec": spec(grads[0]),
    }


def main() -> None:
    task = Rule110Config(width=8, num_strings=2, steps=1, window=8)
    source = make_source(task, "train", seed=0, size=64)
    model = ModelConfig(vocab_size=len(source.vocab), d_model=32, layers=("attn", "gdn"), num_heads=4, mlp_dim=64)
    config = Config(model, SleepConfig(window=8, passes=2, eviction="sliding"))
    train = TrainConfig(steps=10, batch_size=8, warmup_steps=1)
    batches = [
        {k: jnp.asarray(v) for k, v in b.items() if k in ("inputs", "targets", "loss_mask")}
        for b in list(batched(source, 8, seed=0))[:3]
    ]
    key = jax.random.key(0)

    reference = init_train_state(key, config, train)
    reference_losses = []
    for batch in batches:
        reference, metrics = train_step(reference, batch, config, train)
        reference_losses.append(float(metrics["loss"]))
    reference_params = jax.device_get(reference.params)
    reference_logits = np.asarray(forward(reference_params, batches[0]["inputs"], config))
    results = {"devices": jax.device_count(), "reference_losses": reference_losses, "meshes": {}}

    for shape in MESHES:
        mesh = make_mesh(MeshConfig(*shape))
        sharded = ShardedTraining.create(config, train, mesh)
        state = sharded.init(key)
        losses = []
        for batch in batches:
            state, metrics = sharded.step(state, batch)
            losses.append(float(metrics["loss"]))
        up = state.params["params"]["blocks_1"]["mlp"]["up"]["kernel"]
        mu_up = next(
            leaf
            for path, leaf in jax.tree_util.tree_leaves_with_path(state.opt_state)
            if "blocks_1" in jax.tree_util.keystr(path) and "'up'" in jax.tree_util.keystr(path)
        )
        results["meshes"][str(shape)] = {
            "losses": losses,
            "params_error": max(
                relative(a, b)
                for a, b in zip(
                    jax.tree.leaves(jax.device_get(state.params)), jax.tree.leaves(reference_params), strict=True
                )
            ),
            "up_spec": spec(up),
            "up_shard_shape": list(up.addressable_shards[0].data.shape),
            "up_opt_spec": spec(mu_up),
            "embedding_spec": spec(state.params["params"]["embedding"]["embedding"]),
        }

        if shape == (2, 2, 2):  # eval and streaming under the mesh (one mesh: each costs compiles)
            results["meshes"][str(shape)] |= eval_and_stream(
                mesh, sharded, state, batches[0]["inputs"], reference_logits
            )

    results |= data_parallel_zero1(config, train, batches, key, reference_params)
    results |= pallas_under_mesh()
    try:
        ShardedTraining.create(config, train, make_mesh(MeshConfig(data=2, fsdp=1, tensor=3), jax.devices()[:6]))
    except ValueError as error:
        results["tensor3_error"] = str(error)
    print("RESULTS " + json.dumps(results))


if __name__ == "__main__":
    main()
