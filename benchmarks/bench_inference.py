"""Inference costs, each as a ratio against a baseline measured in the same run:

1. per-token wake latency after 1k, 16k and 128k tokens of history, for the sleeping model (hard eviction) and for
   the same model without eviction (full attention over a KV cache that holds the whole history);
2. peak memory of `score` over 16k and 1M tokens (process peak RSS of a fresh process each, and the compiled
   block's device buffers);
3. the cost of one sleep against the N - 1 window passes it runs, for N in {1, 2, 4};
4. decode tokens/s of `generate` at batch 1 and 64.

    python benchmarks/bench_inference.py [--out benchmarks/results/inference_cpu.json] [--quick]

Latency is data independent, so the no-eviction state at history H is built with random keys and values at
position H rather than by a prefill of H tokens (which would cost O(H^2)); the sleeping model's state is built by
streaming the H tokens for real. A plot lands beside the JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from common import write_record

from sleeplm import Config, ModelConfig, SleepConfig, init_params, init_state, sleep_step, wake_step
from sleeplm.cli.timing import median_seconds
from sleeplm.core.passes import window_pass
from sleeplm.inference.generate import generate
from sleeplm.inference.streams import start_stream
from sleeplm.model.mixer import window_start

MODEL = ModelConfig(vocab_size=256, d_model=128, layers=("attn", "gdn", "attn", "gdn"), num_heads=4)
WINDOW = 128


def config_for(passes: int = 2, eviction: str = "hard") -> Config:
    return Config(MODEL, SleepConfig(window=WINDOW, passes=passes, eviction=eviction))


def tokens(rng, batch: int, length: int) -> jax.Array:
    return jnp.asarray(rng.integers(0, MODEL.vocab_size, (batch, length)), jnp.int32)


def streamed_state(params, config: Config, history: int, rng):
    """The state after streaming `history` tokens (in pieces of 8 windows), then slept on, so timed steps start a
    fresh window."""
    state = init_state(config, 1)
    piece = 8 * WINDOW
    for start in range(0, history, piece):
        _, state = wake_step(params, state, tokens(rng, 1, min(piece, history - start)), config)
    return sleep_step(params, state, config)


def full_attention_state(params, config: Config, history: int, steps: int, rng):
    """A no-eviction state at position `history` with room for `steps` more tokens, its caches random."""
    state = init_state(config, 1, capacity=history + steps)
    leaves, treedef = jax.tree.flatten(state.caches)
    keys = jax.random.split(jax.random.key(int(rng.integers(1 << 30))), len(leaves))
    layers = treedef.unflatten([jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves, strict=True)])
    return state._replace(layers=layers, pos=jnp.full((1,), history, jnp.int32))


def per_token_latency(params, config: Config, state, steps: int, rng) -> float:
    """Median over 3 runs of (time of `steps` chained one-token wake steps) / steps; no step sleeps."""
    feed = tokens(rng, 1, steps)
    jax.block_until_ready(wake_step(params, jax.tree.map(jnp.copy, state), feed[:, :1], config))  # compile

    def chain(state):
        for t in range(steps):
            logits, state = wake_step(params, state, feed[:, t : t + 1], config)
        return logits

    return median_seconds(lambda s: chain(jax.tree.map(jnp.copy, s)), state, repeats=3, warmup=False) / steps


def latency(params_by_config, histories, steps, rng) -> list[dict]:
    rows = []
    sleeping, full = config_for(2, "hard"), config_for(2, "none")
    for history in histories:
        state = streamed_state(params_by_config, sleeping, history, rng)
        sleeping_s = per_token_latency(params_by_config, sleeping, state, steps, rng)
        full_state = full_attention_state(params_by_config, full, history, steps + 1, rng)
        full_s = per_token_latency(params_by_config, full, full_state, steps, rng)
        rows.append({"history": history, "sleeping_ms": 1e3 * sleeping_s, "no_eviction_ms": 1e3 * full_s})
        print(
            f"history {history:>7}: sleeping {1e3 * sleeping_s:.3f} ms/token, no eviction {1e3 * full_s:.3f} ms/token"
        )
    for row in rows:
        row["sleeping_vs_first"] = row["sleeping_ms"] / rows[0]["sleeping_ms"]
        row["no_eviction_vs_first"] = row["no_eviction_ms"] / rows[0]["no_eviction_ms"]
    return rows


def score_peak_memory(length: int, block_windows: int) -> dict:
    """Runs `score` over `length` random tokens in a fresh process; its peak RSS and the block's buffers."""
    command = [sys.executable, __file__, "--score-child", str(length), "--block-windows", str(block_windows)]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def score_child(length: int, block_windows: int) -> None:
    from sleeplm.inference.score import MAX_BUCKETS, ScoreCarry, score, score_block

    config = config_for(2, "hard")
    params = init_params(jax.random.key(0), config)
    sequence = np.random.default_rng(0).integers(0, MODEL.vocab_size, (1, length), dtype=np.int32)
    start = time.perf_counter()
    result = score(params, sequence, config, block_windows=block_windows)
    seconds = time.perf_counter() - start
    block = block_windows * WINDOW
    carry = ScoreCarry(
        init_state(config, 1), jnp.zeros((1, MODEL.vocab_size)), jnp.zeros((1,), jnp.int32),
        jnp.zeros((MAX_BUCKETS,)), jnp.zeros((MAX_BUCKETS,), jnp.int32),
    )  # fmt: skip
    lowered = score_block.lower(params, carry, jnp.zeros((1, block), jnp.int32), jnp.ones((1, block), bool), config)
    analysis = lowered.compile().memory_analysis()
    device = {
        name: getattr(analysis, f"{name}_size_in_bytes", None)
        for name in ("argument", "output", "temp", "generated_code")
    }
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    print(json.dumps({"tokens": length, "peak_rss_bytes": peak, "compiled_bytes": device, "seconds": seconds,
                      "mean_nll": result.mean_nll}))  # fmt: skip


def window_pass_seconds(params, config: Config, state) -> float:
    """One pass of the block stack over a whole window (what each sleep pass runs), from the state's caches."""
    context = window_start(1, WINDOW, state.prev_valid)
    one_pass = jax.jit(window_pass, static_argnames=("config",))
    return median_seconds(lambda s: one_pass(params, s.sleep_input, s.layers, context, config)[0], state)


def sleep_cost(passes: int, rng) -> dict:
    """One sleep (from a copy of a full window's state: sleep_step donates it) against one window pass."""
    config = config_for(passes, "hard")
    params = init_params(jax.random.key(0), config)
    _, full = wake_step(params, init_state(config, 1), tokens(rng, 1, WINDOW), config)
    sleep_s = median_seconds(lambda s: sleep_step(params, jax.tree.map(jnp.copy, s), config).pos, full)
    pass_s = window_pass_seconds(params, config, full)
    ratio = sleep_s / ((passes - 1) * pass_s) if passes > 1 else None
    shown = f"{ratio:.2f}" if ratio else "n/a (no pass)"
    print(f"N={passes}: sleep {1e3 * sleep_s:.2f} ms, window pass {1e3 * pass_s:.2f} ms, sleep / (N-1) passes {shown}")
    return {"passes": passes, "sleep_ms": 1e3 * sleep_s, "window_pass_ms": 1e3 * pass_s, "sleep_vs_passes": ratio}


def decode_rate(params, batches, new_tokens, rng) -> list[dict]:
    config = config_for(2, "hard")
    rows = []
    for batch in batches:
        prompts = list(np.asarray(tokens(rng, batch, 16)))

        def run(batch=batch, prompts=prompts):
            stream = start_stream(config, batch, jax.random.key(0))
            return generate(params, stream, prompts, config, max_new_tokens=new_tokens).tokens

        seconds = median_seconds(run, repeats=3)
        rows.append({"batch": batch, "tokens_per_s": batch * new_tokens / seconds, "seconds": seconds})
        print(
            f"decode batch {batch:>3}: {batch * new_tokens / seconds:,.0f} tokens/s ({new_tokens} new tokens per row)"
        )
    return rows


def plot(results: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 4, figsize=(17, 3.8))
    lat = results["wake_latency"]
    axes[0].plot([r["history"] for r in lat], [r["sleeping_ms"] for r in lat], marker="o", label="sleeping (hard)")
    axes[0].plot([r["history"] for r in lat], [r["no_eviction_ms"] for r in lat], marker="o", label="no eviction")
    axes[0].set(xscale="log", yscale="log", xlabel="history (tokens)", ylabel="ms per token", title="wake latency")
    axes[0].legend(fontsize=8)
    mem = results["score_memory"]
    axes[1].bar([f"{r['tokens']:,}" for r in mem], [r["peak_rss_bytes"] / 2**20 for r in mem])
    axes[1].set(xlabel="tokens scored", ylabel="peak RSS (MiB)", title="score: peak memory")
    sl = [r for r in results["sleep_cost"] if r["sleep_vs_passes"]]
    axes[2].bar([f"N={r['passes']}" for r in sl], [r["sleep_vs_passes"] for r in sl])
    axes[2].axhline(1.0, color="gray", linestyle="--")
    axes[2].set(ylabel="sleep / ((N-1) window passes)", title="cost of a sleep")
    dec = results["decode"]
    axes[3].bar([f"batch {r['batch']}" for r in dec], [r["tokens_per_s"] for r in dec])
    axes[3].set(ylabel="tokens / s", title="decode")
    figure.suptitle(
        f"sleeplm inference, d={MODEL.d_model}, {len(MODEL.layers)} blocks, L={WINDOW} ({jax.devices()[0].platform})"
    )
    figure.tight_layout()
    figure.savefig(out, dpi=110)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None)
    parser.add_argument("--quick", action="store_true", help="small sizes, to check the script runs")
    parser.add_argument("--score-child", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--block-windows", type=int, default=16)
    args = parser.parse_args()
    if args.score_child is not None:
        return score_child(args.score_child, args.block_windows)
    rng = np.random.default_rng(0)
    histories = (1024, 4096) if args.quick else (1024, 16_384, 131_072)
    score_lengths = (4096, 16_384) if args.quick else (16_384, 1_048_576)
    params = init_params(jax.random.key(0), config_for())
    results = {"model": dataclasses.asdict(MODEL), "window": WINDOW}
    results["wake_latency"] = latency(params, histories, 32 if args.quick else 64, rng)
    results["score_memory"] = [score_peak_memory(n, args.block_windows) for n in score_lengths]
    for row in results["score_memory"]:
        row["peak_vs_first"] = row["peak_rss_bytes"] / results["score_memory"][0]["peak_rss_bytes"]
        print(f"score {row['tokens']:>9,} tokens: peak RSS {row['peak_rss_bytes'] / 2**20:.0f} MiB "
              f"({row['peak_vs_first']:.3f}x the first), {row['seconds']:.1f} s")  # fmt: skip
    results["sleep_cost"] = [sleep_cost(passes, rng) for passes in (1, 2, 4)]
    results["decode"] = decode_rate(params, (1, 64), 32 if args.quick else 128, rng)
    write_record(args, results)
    if args.out:
        plot(results, Path(args.out).with_suffix(".png"))


if __name__ == "__main__":
    main()
