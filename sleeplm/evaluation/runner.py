"""Running the suite: each prompt goes through the model in blocks of whole windows, then `generate` answers
greedily; outputs are decoded with the run's codec and scored per task x length x depth.

Prompt processing runs `consume` (the streaming path `generate` itself runs) in one jitted function of a fixed
block of `block_windows` windows per call, so every block reuses one compile and the device holds one block, the
stream's state and one row of logits per row, whatever the prompt's length; the stream sleeps as each window
fills. The prompt's last block (1 to block tokens) goes to `generate`, which also samples the answer. A `generate`
call with the whole prompt would pad it to a power of two and hold its hidden states on the device at once.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from sleeplm.config import Config
from sleeplm.core.parameters import Params
from sleeplm.core.streaming import consume
from sleeplm.data.task import Codec
from sleeplm.evaluation.scoring import METRICS
from sleeplm.evaluation.tasks import TASKS, make_example
from sleeplm.inference.generate import generate
from sleeplm.inference.streams import Stream, start_stream


@functools.partial(jax.jit, static_argnames=("config",), donate_argnames=("stream",))
def feed(params: Params, stream: Stream, ids: jax.Array, config: Config) -> Stream:
    """Feeds every row's ids (B, n) into the stream's state, as `generate` would. The next-token logits are left
    as they are: the prompt's last block always goes to `generate`, which sets them."""
    _, state = consume(params, stream.state, ids, jnp.ones(ids.shape, bool), config)
    return stream._replace(state=state, consumed=stream.consumed + ids.shape[1])


def greedy_answers(
    params: Params,
    config: Config,
    prompts: np.ndarray,
    max_new_tokens: int,
    *,
    block_windows: int = 16,
    on_block: Callable[[int], None] | None = None,
) -> np.ndarray:
    """Greedy continuations (B, max_new_tokens) of prompts (B, T) of equal length; `on_block(tokens fed so far)`
    runs after each block. The no-eviction mode gets a stream of capacity T + max_new_tokens (its memory grows)."""
    batch, length = prompts.shape
    block = block_windows * config.sleep.window
    capacity = None if config.sleep.eviction_mode.bounded else length + max_new_tokens
    stream = start_stream(config, batch, jax.random.key(0), capacity)
    last = (length - 1) // block * block
    for start in range(0, last, block):
        stream = feed(params, stream, jnp.asarray(prompts[:, start : start + block], jnp.int32), config)
        jax.block_until_ready(stream.consumed)  # one block in flight: the host never queues the prompt's blocks
        if on_block is not None:
            on_block(start + block)
    return generate(params, stream, list(prompts[:, last:]), config, max_new_tokens=max_new_tokens).tokens


def check_length(codec: Codec, tasks: Sequence[str], length: int, depths: Sequence[float], samples: int, seed: int):
    """Builds every example at `length`; a prompt that does not fit fails naming the task. An example's needles and
    question do not depend on the length, so checking the shortest length checks them all."""
    for task in tasks:
        for depth in depths:
            for sample in range(samples):
                make_example(task, codec, length, depth, sample, seed)


def run_suite(
    params: Params,
    config: Config,
    codec: Codec,
    tasks: Sequence[str],
    lengths: Sequence[int],
    depths: Sequence[float],
    samples: int,
    seed: int,
    *,
    block_windows: int = 16,
    batch_size: int = 32,
    progress: bool = False,
) -> dict:
    """The suite's results: per task its metric and tokens generated, a record per example (needles, answers,
    output, score) and the summary, the mean score of each task x length x depth cell."""
    cases = [(depth, sample) for depth in depths for sample in range(samples)]
    total = len(tasks) * sum(lengths) * len(cases)
    bar = tqdm(total=total, disable=not progress, unit="tok", desc="evaluate-long")
    records = []
    for task in tasks:
        suite_task = TASKS[task]
        for length in lengths:
            for first in range(0, len(cases), batch_size):
                chunk = [make_example(task, codec, length, d, s, seed) for d, s in cases[first : first + batch_size]]
                prompts = np.stack([example.ids for example in chunk])
                on_block = advance(bar, len(chunk))
                tokens = greedy_answers(
                    params, config, prompts, suite_task.max_new_tokens, block_windows=block_windows, on_block=on_block
                )
                on_block(length)
                for example, row in zip(chunk, tokens, strict=True):
                    output = codec.decode([int(t) for t in row])
                    score = METRICS[suite_task.metric](output, example.answers)
                    records.append(example.record() | {"output": output, "score": score})
    bar.close()
    return {
        "tasks": {t: {"metric": TASKS[t].metric, "max_new_tokens": TASKS[t].max_new_tokens} for t in tasks},
        "lengths": list(lengths),
        "depths": list(depths),
        "samples": samples,
        "seed": seed,
        "records": records,
        "summary": summary(records),
    }


def advance(bar: tqdm, rows: int) -> Callable[[int], None]:
    """`on_block` for a batch of `rows` prompts: moves the bar by the tokens fed since its last call."""
    fed_before = 0

    def on_block(fed: int) -> None:
        nonlocal fed_before
        bar.update((fed - fed_before) * rows)
        fed_before = fed

    return on_block


def summary(records: list[dict]) -> list[dict]:
    """The mean score of each (task, length, depth) cell, in the records' order."""
    cells: dict[tuple, list[float]] = {}
    for record in records:
        cells.setdefault((record["task"], record["length"], record["depth"]), []).append(record["score"])
    return [
        {"task": t, "length": n, "depth": d, "examples": len(s), "accuracy": float(np.mean(s))}
        for (t, n, d), s in cells.items()
    ]
