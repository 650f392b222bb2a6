"""`sleeplm stream`: the wake/sleep core end to end on this machine.

For N in {1, 2, 4} passes it streams a multi-window sequence through `wake_step` (sleeping at each full window),
checks that the logits equal the scan-compiled `forward`, and times one wake step and one sleep, side by side in
one run: wake latency should not depend on N, sleep should cost about N - 1 window passes.
"""

from __future__ import annotations

import argparse
import dataclasses

import jax
import jax.numpy as jnp

from sleeplm.cli.timing import median_seconds
from sleeplm.config import Config, ModelConfig, SleepConfig
from sleeplm.core.forward import forward
from sleeplm.core.parameters import init_params
from sleeplm.core.state import init_state
from sleeplm.core.streaming import sleep_step, wake_step

DEFAULT = Config(
    ModelConfig(vocab_size=64, d_model=128, layers=("attn", "gdn", "attn", "gdn"), num_heads=4),
    SleepConfig(window=32, passes=1, eviction="hard"),
)


def run_demo(base: Config = DEFAULT, passes: tuple[int, ...] = (1, 2, 4), windows: int = 4, batch: int = 4) -> list:
    """Per N: streaming-vs-forward error, and median times of a 1-token wake step, a wake pass over a whole
    window, and a sleep (each timed from a copy of the same state)."""
    window = base.sleep.window
    tokens = jax.random.randint(jax.random.key(1), (batch, windows * window), 0, base.model.vocab_size)
    copy = lambda state: jax.tree.map(jnp.copy, state)  # wake_step/sleep_step donate their state
    timed_wake = lambda params, state, tokens, config: wake_step(params, copy(state), tokens, config)[0]
    timed_sleep = lambda params, state, config: sleep_step(params, copy(state), config)
    rows = []
    for n in passes:
        config = dataclasses.replace(base, sleep=dataclasses.replace(base.sleep, passes=n))
        params = init_params(jax.random.key(0), config)
        reference = forward(params, tokens, config)
        state, streamed = init_state(config, batch), []
        for t in range(tokens.shape[1]):  # token by token; a full window is slept on when the next token comes
            logits, state = wake_step(params, state, tokens[:, t : t + 1], config)
            streamed.append(logits)
        error = float(jnp.max(jnp.abs(jnp.concatenate(streamed, 1) - reference)) / jnp.max(jnp.abs(reference)))

        empty = init_state(config, batch)
        _, half = wake_step(params, copy(empty), tokens[:, : window // 2], config)
        _, full = wake_step(params, copy(empty), tokens[:, :window], config)
        next_token = tokens[:, window // 2 : window // 2 + 1]
        rows.append(
            {
                "passes": n,
                "stream_vs_forward_rel_error": error,
                "wake_token_s": median_seconds(timed_wake, params, half, next_token, config, repeats=20),
                "wake_window_s": median_seconds(timed_wake, params, empty, tokens[:, :window], config, repeats=5),
                "sleep_s": median_seconds(timed_sleep, params, full, config, repeats=5),
            }
        )
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="sleeplm stream", description=__doc__.splitlines()[0])
    parser.add_argument("--passes", default="1,2,4", help="comma-separated N values")
    parser.add_argument("--windows", type=int, default=4)
    args = parser.parse_args(argv)
    m, s = DEFAULT.model, DEFAULT.sleep
    print(
        f"sleeplm stream: {len(m.layers)}-block {'/'.join(m.layers)} hybrid, d={m.d_model}, window L={s.window}, "
        f"{args.windows} windows, {s.eviction} eviction, batch 4, device {jax.devices()[0].platform}"
    )
    rows = run_demo(passes=tuple(int(n) for n in args.passes.split(",")), windows=args.windows)
    print(
        f"{'N':>3} {'stream vs forward':>18} {'1-token wake ms':>16} {'vs first N':>11} {'sleep ms':>9} "
        f"{'sleep / window pass':>20}"
    )
    for row in rows:
        print(
            f"{row['passes']:>3} {row['stream_vs_forward_rel_error']:>18.1e} {1e3 * row['wake_token_s']:>16.2f} "
            f"{row['wake_token_s'] / rows[0]['wake_token_s']:>11.2f} {1e3 * row['sleep_s']:>9.2f} "
            f"{row['sleep_s'] / row['wake_window_s']:>20.2f}"
        )
    print("(wake latency should not grow with N; a sleep should cost about N - 1 window passes)")
    if not all(r["stream_vs_forward_rel_error"] < 1e-4 for r in rows):
        raise SystemExit("MISMATCH: streaming wake/sleep does not reproduce forward")
    print("streaming wake/sleep reproduces the scan-compiled forward for every N (relative error < 1e-4)")
