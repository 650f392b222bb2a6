"""Gated delta rule: forward and forward+backward time of each implementation, side by side in one run.

    python benchmarks/bench_gated_delta.py [--batch 4 --length 2048 --heads 4 --dim 64 --chunk 64] [--out FILE]

Prints a table with the speedup of each implementation over the recurrent reference (measured in the same run).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import jax
import jax.numpy as jnp
from common import write_record

from sleeplm.cli.timing import median_seconds
from sleeplm.ops import gated_delta_rule


def make_inputs(batch: int, length: int, heads: int, dim: int, dtype: jnp.dtype) -> tuple[jax.Array, ...]:
    keys = jax.random.split(jax.random.key(0), 6)
    unit = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)
    q = unit(jax.random.normal(keys[0], (batch, length, heads, dim))).astype(dtype)
    k = unit(jax.random.normal(keys[1], (batch, length, heads, dim))).astype(dtype)
    v = jax.random.normal(keys[2], (batch, length, heads, dim)).astype(dtype)
    g = -jax.random.uniform(keys[3], (batch, length, heads)) * 0.5
    beta = jax.random.uniform(keys[4], (batch, length, heads))
    state = jax.random.normal(keys[5], (batch, heads, dim, dim))
    return q, k, v, g, beta, state


def compiled(implementation: str, chunk: int):
    """Jitted forward and forward+backward (loss value and all six gradients) of one implementation."""
    op = lambda *args: gated_delta_rule(*args, implementation=implementation, chunk_size=chunk)

    def loss(*args):
        out, state = op(*args)
        return jnp.sum(out.astype(jnp.float32) ** 2) + jnp.sum(state**2)

    return jax.jit(op), jax.jit(jax.value_and_grad(loss, argnums=tuple(range(6))))


def benchmark(implementation: str, inputs: tuple[jax.Array, ...], chunk: int, repeats: int) -> dict:
    forward, forward_backward = compiled(implementation, chunk)
    return {
        "forward_s": median_seconds(forward, *inputs, repeats=repeats),
        "forward_backward_s": median_seconds(forward_backward, *inputs, repeats=repeats),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--chunk", type=int, default=64)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--implementations", default="reference,xla")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args()

    inputs = make_inputs(args.batch, args.length, args.heads, args.dim, jnp.dtype(args.dtype))
    names = args.implementations.split(",")
    results = {name: benchmark(name, inputs, args.chunk, args.repeats) for name in names}
    base = results[names[0]]
    for result in results.values():
        result["forward_speedup"] = base["forward_s"] / result["forward_s"]
        result["forward_backward_speedup"] = base["forward_backward_s"] / result["forward_backward_s"]

    shape = f"B={args.batch} T={args.length} H={args.heads} d_k=d_v={args.dim} chunk={args.chunk} {args.dtype}"
    print(f"gated delta rule, {shape}, speedups relative to '{names[0]}' measured in this run")
    print(f"{'implementation':<16}{'fwd ms':>10}{'fwd+bwd ms':>13}{'fwd x':>9}{'fwd+bwd x':>12}")
    for name, r in results.items():
        print(
            f"{name:<16}{1e3 * r['forward_s']:>10.2f}{1e3 * r['forward_backward_s']:>13.2f}"
            f"{r['forward_speedup']:>9.2f}{r['forward_backward_speedup']:>12.2f}"
        )
    write_record(args, results)


if __name__ == "__main__":
    main()
