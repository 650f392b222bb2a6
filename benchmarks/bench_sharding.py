"""Sharded training overhead on fake CPU devices: step time of the same global batch on 1 device vs 8 (meshes
below), and per-device parameter memory of each mesh against the replicated model, measured in one run.

Each layout is also timed on the gradient alone (forward + backward, no optimizer update): the difference from the
full step is the optimizer's share. Under pure data parallelism every device repeats the whole (Muon) update, which
8 fake devices sharing 2 cores pay 8 times over, while on real devices each replica runs concurrently.

    python benchmarks/bench_sharding.py [--preset rule110 --batch 64 --steps 3] [--out FILE]

On 2 CPU cores 8 fake devices cannot be faster; the point is that sharding adds no large overhead.
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import argparse
from pathlib import Path

import jax
import jax.numpy as jnp
from common import write_record

from sleeplm.cli.timing import median_seconds
from sleeplm.data import batched, make_source
from sleeplm.parallel.axes import RULES
from sleeplm.parallel.mesh import MeshConfig, batch_sharding, make_mesh
from sleeplm.training.presets import build_experiment
from sleeplm.training.sharded import ShardedTraining
from sleeplm.training.step import init_train_state, masked_loss, train_step

MESHES = {
    "dp (8,1,1)": ((8, 1, 1), "dp"),
    "fsdp (2,4,1)": ((2, 4, 1), "fsdp"),
    "fsdp+tp (2,2,2)": ((2, 2, 2), "fsdp+tp"),
}


def param_bytes_per_device(params) -> int:
    return sum(leaf.addressable_shards[0].data.nbytes for leaf in jax.tree.leaves(params))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="rule110")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    experiment = build_experiment(args.preset, {"train.batch_size": str(args.batch), "train.steps": "1000"})
    config, train = experiment.config, experiment.train
    source = make_source(experiment.task, "train", size=args.batch)
    batch = {
        k: jnp.asarray(v)
        for k, v in batched(source, args.batch, 0)[0].items()
        if k in ("inputs", "targets", "loss_mask")
    }

    holder = [init_train_state(jax.random.key(0), config, train)]
    replicated_bytes = param_bytes_per_device(holder[0].params)

    def single(b):
        holder[0], metrics = train_step(holder[0], b, config, train)
        return metrics["loss"]

    def gradient(params, b):
        return jax.grad(lambda p: masked_loss(p, b, config))(params)

    rows = {
        "1 device": {
            "step_s": median_seconds(single, batch, repeats=args.steps),
            "gradient_s": median_seconds(jax.jit(gradient), holder[0].params, batch, repeats=args.steps),
            "param_bytes": replicated_bytes,
        }
    }
    for name, (shape, rules) in MESHES.items():
        mesh = make_mesh(MeshConfig(*shape))
        sharded = ShardedTraining.create(config, train, mesh, RULES[rules])
        state = [sharded.init(jax.random.key(0))]

        def step(b, sharded=sharded, state=state):
            state[0], metrics = sharded.step(state[0], b)
            return metrics["loss"]

        params_sharding = sharded.state_shardings.params
        sharded_gradient = jax.jit(
            gradient, in_shardings=(params_sharding, batch_sharding(mesh, sharded.rules)), out_shardings=params_sharding
        )

        def gradient_under_mesh(b, mesh=mesh, fn=sharded_gradient, state=state):
            with jax.set_mesh(mesh):
                return fn(state[0].params, b)

        rows[name] = {
            "step_s": median_seconds(step, batch, repeats=args.steps),
            "gradient_s": median_seconds(gradient_under_mesh, batch, repeats=args.steps),
            "param_bytes": param_bytes_per_device(state[0].params),
        }
    base = rows["1 device"]
    machine = f"{jax.device_count()} fake CPU devices on {os.cpu_count()} cores"
    print(f"{args.preset}: d={config.model.d_model}, global batch {args.batch}, {machine}")
    header = f"{'layout':<18}{'step s':>9}{'vs 1 device':>13}{'grad s':>9}{'vs 1 device':>13}{'optimizer s':>13}"
    print(header + f"{'params/device MB':>18}{'vs replicated':>15}")
    for name, row in rows.items():
        row["step_vs_1_device"] = row["step_s"] / base["step_s"]
        row["gradient_vs_1_device"] = row["gradient_s"] / base["gradient_s"]
        row["optimizer_s"] = row["step_s"] - row["gradient_s"]
        row["param_bytes_vs_replicated"] = row["param_bytes"] / replicated_bytes
        megabytes = row["param_bytes"] / 2**20
        print(
            f"{name:<18}{row['step_s']:>9.3f}{row['step_vs_1_device']:>13.2f}{row['gradient_s']:>9.3f}"
            f"{row['gradient_vs_1_device']:>13.2f}{row['optimizer_s']:>13.3f}{megabytes:>18.2f}"
            f"{row['param_bytes_vs_replicated']:>15.3f}"
        )
    write_record(args, rows)


if __name__ == "__main__":
    main()
