"""The long-context suite's costs on a tiny model (the same as bench_inference's), each as a ratio in the same run:

1. device memory at 16k and at 1M tokens of context: the total bytes of JAX's live buffers (`jax.live_arrays()`)
   after every block of the prompt, the peak of each run and their ratio (target <= 1.1); a buffer that grew with
   the context would show here, where peak RSS (set by compilation) and the compiled block's buffers (fixed by its
   shapes) cannot show it. Host RSS (now and the process peak) is stated beside it;
2. prompt tokens/s of the suite at 64k against `sleeplm.inference.score.score` over the same tokens (ratio near 1:
   the suite costs what reading the tokens costs).

    python benchmarks/bench_long_context.py [--out benchmarks/results/long_context_cpu.json] [--long 1048576]

The prompts are passkey examples (needle at 50%) built with a byte codec (256 tokens); the model is random, so
the answers are not the point here.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import jax
import numpy as np
from common import write_record

from sleeplm import Config, ModelConfig, SleepConfig, init_params
from sleeplm.data.task import Codec
from sleeplm.evaluation.runner import greedy_answers
from sleeplm.evaluation.tasks import TASKS, make_example
from sleeplm.inference.score import score

MODEL = ModelConfig(vocab_size=256, d_model=128, layers=("attn", "gdn", "attn", "gdn"), num_heads=4)
CONFIG = Config(MODEL, SleepConfig(window=128, passes=2, eviction="hard"))
BYTES = Codec(lambda text: list(text.encode("utf-8")), lambda ids: bytes(ids).decode("utf-8", "replace"))
BLOCK_WINDOWS = 16
NEW_TOKENS = TASKS["passkey"].max_new_tokens


def host_memory(field: str) -> int:
    """A memory figure of this process from /proc/self/status, in bytes: "VmRSS" (resident now), "VmHWM" (peak)."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith(f"{field}:"))


def prompt(length: int) -> np.ndarray:
    return make_example("passkey", BYTES, length, 50, 0, seed=0).ids[None]


def memory(params, length: int) -> dict:
    """The suite over one prompt of `length` tokens, sampling live device bytes and host RSS after each block."""
    live, rss = [], []

    def on_block(fed: int) -> None:
        live.append(sum(array.nbytes for array in jax.live_arrays()))
        rss.append(host_memory("VmRSS"))

    ids = prompt(length)
    start = time.perf_counter()
    greedy_answers(params, CONFIG, ids, NEW_TOKENS, block_windows=BLOCK_WINDOWS, on_block=on_block)
    seconds = time.perf_counter() - start
    row = {
        "tokens": length,
        "blocks": len(live),
        "live_device_bytes_peak": max(live),
        "live_device_bytes_first_block": live[0],
        "live_device_bytes_last_block": live[-1],
        "host_rss_bytes_first_block": rss[0],
        "host_rss_bytes_last_block": rss[-1],
        "host_peak_rss_bytes": host_memory("VmHWM"),  # of the process so far (compilation included)
        "seconds": seconds,
        "tokens_per_s": length / seconds,
    }
    print(
        f"{length:>8} tokens: live device bytes peak {row['live_device_bytes_peak']:,} (first block "
        f"{live[0]:,}, last {live[-1]:,}), host RSS {rss[0] / 2**20:.0f} -> {rss[-1] / 2**20:.0f} MiB, {seconds:.1f} s"
    )
    return row


def fastest(runs, repeats: int = 3) -> list[float]:
    """The shortest of `repeats` wall times of each of `runs` (functions returning host values, so nothing is left
    running), taken in turn so that a change in the shared machine's load falls on all of them."""
    times = [[] for _ in runs]
    for _ in range(repeats):
        for run, taken in zip(runs, times, strict=True):
            start = time.perf_counter()
            run()
            taken.append(time.perf_counter() - start)
    return [min(taken) for taken in times]


def speed(params, length: int) -> dict:
    """Prompt tokens/s of the suite and of `score` over the same tokens (both compiled beforehand), the fastest of
    three runs each, in turn (the machine is shared)."""
    ids = prompt(length)
    score(params, ids[:, : BLOCK_WINDOWS * CONFIG.sleep.window + 1], CONFIG, block_windows=BLOCK_WINDOWS)  # compile
    suite_s, score_s = fastest(
        [
            lambda: greedy_answers(params, CONFIG, ids, NEW_TOKENS, block_windows=BLOCK_WINDOWS),
            lambda: score(params, ids, CONFIG, block_windows=BLOCK_WINDOWS),
        ]
    )
    row = {
        "tokens": length,
        "suite_tokens_per_s": length / suite_s,
        "score_tokens_per_s": length / score_s,
        "suite_vs_score": score_s / suite_s,
    }
    print(
        f"{length} tokens: suite {row['suite_tokens_per_s']:.0f} tok/s, score {row['score_tokens_per_s']:.0f} tok/s, "
        f"ratio {row['suite_vs_score']:.3f}"
    )
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=None)
    parser.add_argument("--short", type=int, default=1 << 14, help="the short context (tokens)")
    parser.add_argument("--long", type=int, default=1 << 20, help="the long context (tokens)")
    parser.add_argument("--speed", type=int, default=1 << 16, help="the context the speed is measured at")
    args = parser.parse_args()
    params = init_params(jax.random.key(0), CONFIG)
    short = memory(params, args.short)  # also compiles the feeding block and the answer
    speed_row = speed(params, args.speed)
    long = memory(params, args.long)
    ratio = long["live_device_bytes_peak"] / short["live_device_bytes_peak"]
    print(f"live device bytes peak, {args.long} vs {args.short} tokens: {ratio:.4f} (target <= 1.1)")
    results = {"memory": [short, long], "memory_ratio": ratio, "speed": speed_row}
    write_record(args, results, model=dataclasses.asdict(MODEL), window=CONFIG.sleep.window)


if __name__ == "__main__":
    main()
