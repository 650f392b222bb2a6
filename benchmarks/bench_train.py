"""Training throughput of a preset at several N, model FLOP utilisation against a matmul peak measured in the same
run, and the data pipeline's share of a step (the time to draw the next global batch from the training iterator,
as the training loop does, against the step time).

    python benchmarks/bench_train.py [--preset rule110 --passes 1,2,4 --batch 64 --steps 5] [--out FILE]
    python benchmarks/bench_train.py --preset lm-cpu --passes 1,2 --batch 16 --out benchmarks/results/train_lm_cpu.json

Model FLOPs are counted analytically by `sleeplm.training.flops` (useful work only; it says what counts).
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from common import write_record

from sleeplm.cli.timing import median_seconds
from sleeplm.experiment.schema import TrainConfig
from sleeplm.training.flops import train_flops
from sleeplm.training.presets import build_experiment
from sleeplm.training.run import train_iterator
from sleeplm.training.step import init_train_state, model_batch, train_step


def matmul_peak(size: int = 2048, repeats: int = 5) -> float:
    a = jax.random.normal(jax.random.key(0), (size, size), jnp.float32)
    seconds = median_seconds(jax.jit(lambda x, y: x @ y), a, a, repeats=repeats)
    return 2 * size**3 / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="rule110")
    parser.add_argument("--passes", default="1,2,4")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per N (after a compile step)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    peak = matmul_peak()
    base = build_experiment(args.preset, {"train.batch_size": str(args.batch), "train.steps": "1000"})
    length = base.task.sequence_length
    iterator = train_iterator(base)
    batch = jax.tree.map(jnp.asarray, model_batch(next(iterator)))
    data_s = median_seconds(lambda: next(iterator), repeats=20, warmup=True)  # what the loop waits for each step
    rows = []
    for n in (int(x) for x in args.passes.split(",")):
        config = dataclasses.replace(base.config, sleep=dataclasses.replace(base.config.sleep, passes=n))
        train = TrainConfig(steps=1000, batch_size=args.batch, warmup_steps=10)
        state = init_train_state(jax.random.key(0), config, train)
        holder = [state]

        def step(b, config=config, train=train, holder=holder):
            holder[0], metrics = train_step(holder[0], b, config, train)
            return metrics["loss"]

        seconds = median_seconds(step, batch, repeats=args.steps)
        flops = train_flops(config, batch)
        real_tokens = int(np.asarray(batch.get("valid", batch["inputs"] >= 0)).sum())
        rows.append(
            {
                "passes": n,
                "step_s": seconds,
                "tokens_per_s": real_tokens / seconds,
                "model_flops": flops,
                "achieved_flops_per_s": flops / seconds,
                "mfu": flops / seconds / peak,
                "data_share": data_s / (data_s + seconds),
            }
        )
    for row in rows:
        row["step_time_vs_n1"] = row["step_s"] / rows[0]["step_s"]

    m = base.config.model
    print(
        f"train step, {args.preset}: d={m.d_model}, {len(m.layers)} blocks, L={base.config.sleep.window}, "
        f"sequence {length} tokens, batch {args.batch}; matmul peak measured in this run: {peak / 1e9:.1f} GFLOP/s"
    )
    print(f"data pipeline: {1e3 * data_s:.1f} ms to draw a global batch (median of 20)")
    print(f"{'N':>3}{'step s':>9}{'tokens/s':>10}{'GFLOP/s':>9}{'MFU':>7}{'step vs N=1':>13}{'data share':>12}")
    for r in rows:
        print(
            f"{r['passes']:>3}{r['step_s']:>9.3f}{r['tokens_per_s']:>10.0f}{r['achieved_flops_per_s'] / 1e9:>9.1f}"
            f"{r['mfu']:>7.1%}{r['step_time_vs_n1']:>13.2f}{r['data_share']:>12.1%}"
        )
    write_record(args, rows, matmul_peak_flops_per_s=peak, data_seconds_per_batch=data_s)


if __name__ == "__main__":
    main()
