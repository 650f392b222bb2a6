"""sleeplm against `transformers` on the same checkpoint, on the CPU: prefill and greedy decoding.

    python benchmarks/bench_transformers.py --out benchmarks/results/serve_vs_transformers_cpu.json

The script makes a small Qwen3-Next-layout checkpoint with transformers itself (random weights from transformers'
own initialisation, seed 0; nothing is downloaded): 8 blocks of d_model 256 in Qwen3-Next's layer pattern (3
linear-attention : 1 full-attention, twice), gated attention with 4 query heads and 2 KV heads of 64 (partial
rotary 0.25), Gated DeltaNet with 2 key heads and 4 value heads of 64, dense MLPs of 768, an untied vocabulary of
4096 tokens (small, so the head is not what is timed). It saves it to a temporary directory, converts it with the
CLI (`sleeplm convert --from-hf DIR --out RUN --sleep.window W --sleep.passes N --sleep.eviction sliding`; by
default W = 1024 and N = 1, the model as converted: a full window is evicted with no extra pass) and measures:

- prefill of 2k and 16k tokens: transformers `model(ids, use_cache=True, logits_to_keep=1)` under
  `torch.inference_mode` (full attention over the whole context) against sleeplm's serving engine,
  `Engine(params, config, slots=1)`, `engine.load(0, engine.new_row(...))`, `engine.prefill(0, ids)`, then
  `jax.block_until_ready(engine.stream)` (windows of W tokens; under sliding eviction each query attends to the
  last W positions, and the fast weights carry what is older, so beyond W tokens the converted model is not
  transformers' function: its logits and greedy tokens there are reported, not expected to match). Each size has
  one untimed warm-up call of the same shape per side first, so jax's compilation is excluded (the first call's
  time is reported separately);
- greedy decoding at 1k and 16k tokens of context: tokens/s of `--new-tokens` new tokens, transformers
  `generate(do_sample=False)` from a copy of the prefilled cache (the prompt plus the prefill's greedy token, so
  it runs exactly `--new-tokens` forward passes of one token) against as many `Engine.decode` steps (temperature
  0) from a copy of the prefilled slot, each slept on first when its window is full (with N = 1 that is the
  eviction alone; it is inside the timed steps). The first tokens of both are compared (agreement reported), and
  the last prompt token's logits too. transformers' decoding is also timed at 1 thread (`speedup_vs_1thread`):
  on a loaded machine its 2-thread decoding, hundreds of tiny ops per token, stalls at OpenMP barriers whenever
  one of its threads is descheduled, and is then several times slower than at 1 thread.

Both sides run in their own worker process, pinned to the same 2 cores (`os.sched_setaffinity`), never at the
same time: torch with `torch.set_num_threads(2)` (and 1 inter-op thread), jax with its default CPU client, whose
thread pool is sized from the 2-core affinity mask (`--xla_cpu_multi_thread_eigen=true`). The parent alternates the
two sides (A B A B ...) for `--repeats` rounds and reports medians of wall time, and the ratio sleeplm /
transformers of the rates (> 1: sleeplm is faster), against the issue's targets: prefill >= 1.2x, decoding >= 3x.
Each call's process CPU time is recorded beside its wall time (`cpu_speedup`: the same ratio in CPU seconds, less
sensitive to other processes on a shared machine). A bar chart lands beside the JSON.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPLY = "@@reply "  # a worker's answer on its stdout (anything else the libraries print is passed through)
TARGETS = {"prefill": 1.2, "decode": 3.0}


def qwen3_next_config(vocab: int) -> dict:
    return dict(
        vocab_size=vocab,
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=8,
        layer_types=["linear_attention"] * 3 + ["full_attention"] + ["linear_attention"] * 3 + ["full_attention"],
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        linear_num_key_heads=2,
        linear_num_value_heads=4,
        linear_key_head_dim=64,
        linear_value_head_dim=64,
        linear_conv_kernel_dim=4,
        num_experts=0,
        max_position_embeddings=65536,
        tie_word_embeddings=False,
        eos_token_id=1,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25},
    )


def make_checkpoint(directory: Path, vocab: int) -> None:
    import torch
    import transformers

    torch.manual_seed(0)
    model = transformers.Qwen3NextForCausalLM(transformers.Qwen3NextConfig(**qwen3_next_config(vocab)))
    model.float().eval().save_pretrained(directory, safe_serialization=True)


def prompt(length: int, vocab: int):
    import numpy as np

    return np.random.default_rng(length).integers(2, vocab, length).astype(np.int64)  # 0, 1 are pad and eos


# ------------------------------------------------------------------------------------------------------- workers


class TorchSide:
    def __init__(self, checkpoint: str, vocab: int) -> None:
        import torch
        import transformers

        torch.set_num_threads(2)
        torch.set_num_interop_threads(1)
        self.torch, self.vocab = torch, vocab
        self.model = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
        self.model.generation_config.eos_token_id = None  # never stop early: every run makes all its tokens
        self.model.generation_config.pad_token_id = 0
        self.saved = {}  # context length -> (ids, cache after them, the last token's logits)

    def prefill(self, n: int) -> dict:
        torch = self.torch
        ids = torch.as_tensor(prompt(n, self.vocab))[None]
        with torch.inference_mode():
            start, cpu = time.perf_counter(), time.process_time()
            out = self.model(ids, use_cache=True, logits_to_keep=1)
            seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
        logits = out.logits[0, -1].float()
        self.saved[n] = (ids, out.past_key_values, logits)
        return {"seconds": seconds, "cpu_seconds": cpu, "logits": logits.tolist()}

    def decode(self, n: int, new: int, threads: int = 2) -> dict:
        torch = self.torch
        torch.set_num_threads(threads)
        ids, cache, logits = self.saved[n]
        first = int(torch.argmax(logits))
        cache = copy.deepcopy(cache)
        feed = torch.cat([ids, torch.tensor([[first]])], dim=1)
        with torch.inference_mode():
            start, cpu = time.perf_counter(), time.process_time()
            out = self.model.generate(
                feed, attention_mask=torch.ones_like(feed), past_key_values=cache, do_sample=False,
                max_new_tokens=new, min_new_tokens=new,
            )  # fmt: skip
            seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
        torch.set_num_threads(2)
        return {"seconds": seconds, "cpu_seconds": cpu, "tokens": [first, *out[0, feed.shape[1] :].tolist()][:new]}


class JaxSide:
    def __init__(self, run: str, vocab: int, prefill_tokens: int) -> None:
        import jax
        import numpy as np

        from sleeplm.inference.engine import Engine, SlotSampling

        self.jax, self.np, self.vocab = jax, np, vocab
        self.engine = Engine.from_workdir(Path(run), slots=1, prefill_tokens=prefill_tokens)
        self.greedy = SlotSampling(np.zeros(1, np.float32), np.zeros(1, np.int32), np.ones(1, np.float32))
        self.saved = {}  # context length -> the slot's stream after the prompt (host arrays)

    def prefill(self, n: int) -> dict:
        engine, np = self.engine, self.np
        engine.load(0, engine.new_row(np.zeros(2, np.uint32)))
        self.jax.block_until_ready(engine.stream)
        ids = prompt(n, self.vocab).astype(np.int32)
        start, cpu = time.perf_counter(), time.process_time()
        engine.prefill(0, ids)
        self.jax.block_until_ready(engine.stream)
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
        self.saved[n] = engine.unload(0)
        logits = np.asarray(self.saved[n].logits[0], np.float32)
        return {"seconds": seconds, "cpu_seconds": cpu, "logits": logits.tolist()}

    def decode(self, n: int, new: int) -> dict:
        engine, np = self.engine, self.np
        engine.load(0, self.saved[n])
        self.jax.block_until_ready(engine.stream)
        active, tokens, sleeps = np.ones(1, bool), [], 0
        start, cpu = time.perf_counter(), time.process_time()
        for _ in range(new):
            if engine.is_full(0):
                engine.sleep(0)
                sleeps += 1
            tokens.append(int(engine.decode(active, self.greedy).tokens[0]))  # reads the token: a host sync
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
        return {"seconds": seconds, "cpu_seconds": cpu, "tokens": tokens, "sleeps": sleeps}


def worker(side: str, path: str, vocab: int, prefill_tokens: int) -> None:
    """Answers {"op": "prefill"|"decode", ...} requests, one JSON line each, until stdin closes."""
    chosen = TorchSide(path, vocab) if side == "torch" else JaxSide(path, vocab, prefill_tokens)
    for line in sys.stdin:
        request = json.loads(line)
        op = request.pop("op")
        answer = getattr(chosen, op)(**request)
        print(REPLY + json.dumps(answer), flush=True)


class Worker:
    def __init__(self, side: str, path: Path, args, cores: set[int]) -> None:
        command = [sys.executable, __file__, "--worker", side, "--worker-path", str(path), "--vocab", str(args.vocab),
                   "--prefill-tokens", str(args.prefill_tokens)]  # fmt: skip
        env = dict(os.environ, OMP_NUM_THREADS="2", MKL_NUM_THREADS="2")
        if side == "jax":
            flags = os.environ.get("XLA_FLAGS", "")
            env["XLA_FLAGS"] = f"{flags} --xla_cpu_multi_thread_eigen=true".strip()
        self.side = side
        self.process = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
            preexec_fn=lambda: os.sched_setaffinity(0, cores),
        )  # fmt: skip

    def ask(self, op: str, **request) -> dict:
        self.process.stdin.write(json.dumps({"op": op, **request}) + "\n")
        self.process.stdin.flush()
        for line in self.process.stdout:
            if line.startswith(REPLY):
                return json.loads(line[len(REPLY) :])
            print(f"[{self.side}] {line}", end="", file=sys.stderr)
        raise RuntimeError(f"the {self.side} worker exited (code {self.process.wait()})")

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait()


# ------------------------------------------------------------------------------------------------------- measure


def relative_error(actual, expected) -> float:
    import numpy as np

    actual, expected = np.asarray(actual), np.asarray(expected)
    return float(np.max(np.abs(actual - expected)) / np.max(np.abs(expected)))


def alternate(sides: dict, op: str, repeats: int, **request) -> dict[str, list[dict]]:
    """One untimed warm-up call per side, then `repeats` rounds of A B (...). `sides`: {name: worker} or
    {name: (worker, extra request fields)}."""
    sides = {name: side if isinstance(side, tuple) else (side, {}) for name, side in sides.items()}
    ask = lambda name: sides[name][0].ask(op, **request, **sides[name][1])
    runs = {name: [ask(name)] for name in sides}
    for _ in range(repeats):
        for name in sides:
            runs[name].append(ask(name))
    return runs


def median_of(runs: list[dict], key: str = "seconds") -> float:
    return statistics.median(run[key] for run in runs[1:])


def measure_prefill(workers, n: int, repeats: int) -> dict:
    runs = alternate(workers, "prefill", repeats, n=n)
    seconds = {side: median_of(r) for side, r in runs.items()}
    row = {
        "tokens": n,
        "transformers_s": seconds["torch"],
        "sleeplm_s": seconds["jax"],
        "transformers_tok_s": n / seconds["torch"],
        "sleeplm_tok_s": n / seconds["jax"],
        "speedup": seconds["torch"] / seconds["jax"],
        **side_by_side(runs),
        "sleeplm_first_call_s": runs["jax"][0]["seconds"],  # compilation included
        "last_logits_rel_error": relative_error(runs["jax"][-1]["logits"], runs["torch"][-1]["logits"]),
    }
    print(
        f"prefill {n:>6}: transformers {row['transformers_s']:.3f} s, sleeplm {row['sleeplm_s']:.3f} s "
        f"(first call {row['sleeplm_first_call_s']:.2f} s) -> {row['speedup']:.2f}x "
        f"(target {TARGETS['prefill']}x; CPU time {row['cpu_speedup']:.2f}x); "
        f"last-token logits rel. error {row['last_logits_rel_error']:.1e}",
        flush=True,
    )
    return row


def side_by_side(runs: dict) -> dict:
    """Each side's timed runs (wall and CPU seconds; the first, untimed call left out) and the CPU-time ratio."""
    return {
        "transformers_runs_s": [r["seconds"] for r in runs["torch"][1:]],
        "sleeplm_runs_s": [r["seconds"] for r in runs["jax"][1:]],
        "transformers_runs_cpu_s": [r["cpu_seconds"] for r in runs["torch"][1:]],
        "sleeplm_runs_cpu_s": [r["cpu_seconds"] for r in runs["jax"][1:]],
        "transformers_cpu_s": median_of(runs["torch"], "cpu_seconds"),
        "sleeplm_cpu_s": median_of(runs["jax"], "cpu_seconds"),
        "cpu_speedup": median_of(runs["torch"], "cpu_seconds") / median_of(runs["jax"], "cpu_seconds"),
    }


def measure_decode(workers, n: int, new: int, repeats: int, prefilled: set[int]) -> dict:
    if n not in prefilled:  # the context's state (untimed here)
        for worker in workers.values():
            worker.ask("prefill", n=n)
        prefilled.add(n)
    # transformers also at 1 thread: on a loaded machine its 2-thread decode stalls at OpenMP barriers
    sides = {"torch": workers["torch"], "torch1": (workers["torch"], {"threads": 1}), "jax": workers["jax"]}
    runs = alternate(sides, "decode", repeats, n=n, new=new)
    seconds = {side: median_of(r) for side, r in runs.items()}
    ours, theirs = runs["jax"][-1]["tokens"], runs["torch"][-1]["tokens"]
    agree = next((i for i, (a, b) in enumerate(zip(ours, theirs, strict=True)) if a != b), len(ours))
    row = {
        "context": n,
        "new_tokens": new,
        "transformers_tok_s": new / seconds["torch"],
        "sleeplm_tok_s": new / seconds["jax"],
        "speedup": seconds["torch"] / seconds["jax"],
        **side_by_side(runs),
        "transformers_1thread_tok_s": new / seconds["torch1"],
        "speedup_vs_1thread": seconds["torch1"] / seconds["jax"],
        "transformers_1thread_runs_s": [r["seconds"] for r in runs["torch1"][1:]],
        "transformers_1thread_runs_cpu_s": [r["cpu_seconds"] for r in runs["torch1"][1:]],
        "sleeplm_sleeps": runs["jax"][-1]["sleeps"],
        "greedy_tokens_agree_first": agree,
        "sleeplm_tokens": ours,
        "transformers_tokens": theirs,
    }
    print(
        f"decode at {n:>6}: transformers {row['transformers_tok_s']:.1f} tok/s, sleeplm {row['sleeplm_tok_s']:.1f} "
        f"tok/s -> {row['speedup']:.2f}x (target {TARGETS['decode']}x; CPU time {row['cpu_speedup']:.2f}x); "
        f"against transformers at 1 thread ({row['transformers_1thread_tok_s']:.1f} tok/s) "
        f"{row['speedup_vs_1thread']:.2f}x; greedy tokens agree for the first "
        f"{agree} of {new} ({row['sleeplm_sleeps']} sleeps in sleeplm's steps)",
        flush=True,
    )
    return row


def plot(results: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    for axis, key, label, unit in (
        (axes[0], "prefill", "tokens", "prefill tokens/s"),
        (axes[1], "decode", "context", "decode tokens/s"),
    ):
        rows = results[key]
        x = range(len(rows))
        series = [("transformers (2 threads)", "transformers_tok_s")]
        if key == "decode":
            series.append(("transformers (1 thread)", "transformers_1thread_tok_s"))
        series.append(("sleeplm", "sleeplm_tok_s"))
        width = 0.8 / len(series)
        colors = {"sleeplm_tok_s": "tab:orange", "transformers_tok_s": "tab:blue"}
        for j, (name, field) in enumerate(series):
            offset = (j - (len(series) - 1) / 2) * width
            color = colors.get(field, "tab:cyan")
            axis.bar([i + offset for i in x], [r[field] for r in rows], width, label=name, color=color)
        for i, r in zip(x, rows, strict=True):
            top = max(r[field] for _, field in series)
            text = f"{r['speedup']:.2f}x"
            if key == "decode":
                text += f" ({r['speedup_vs_1thread']:.2f}x vs 1 thread)"
            axis.text(i, top * 1.02, text, ha="center", fontsize=8)
        axis.set_xticks(list(x), [f"{r[label]:,} {'tokens' if key == 'prefill' else 'context'}" for r in rows])
        axis.set(ylabel=unit, title=f"{key} (target {TARGETS[key]}x)")
        axis.margins(y=0.15)
        axis.legend(fontsize=8)
    sleep = results["sleep"]
    figure.suptitle(
        f"sleeplm (window {sleep['window']}, N={sleep['passes']}, {sleep['eviction']}) vs transformers "
        "(full attention), Qwen3-Next layout d=256 x 8 blocks, CPU, 2 pinned cores"
    )
    figure.tight_layout()
    figure.savefig(out, dpi=110)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None)
    parser.add_argument("--prefill", default="2048,16384", help="prompt lengths to prefill")
    parser.add_argument("--contexts", default="1024,16384", help="context lengths to decode at")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds per measurement (after one warm-up)")
    parser.add_argument("--window", type=int, default=1024, help="sleeplm's window L")
    parser.add_argument("--passes", type=int, default=1, help="sleeplm's N (1: the model as converted)")
    parser.add_argument("--eviction", default="sliding")
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--prefill-tokens", type=int, default=2048, help="the engine's prompt piece (its default)")
    parser.add_argument("--quick", action="store_true", help="small sizes, to check the script runs")
    parser.add_argument("--worker", choices=("torch", "jax"), default=None, help=argparse.SUPPRESS)
    parser.add_argument("--worker-path", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker, args.worker_path, args.vocab, args.prefill_tokens)
    if args.quick:
        args.prefill, args.contexts, args.new_tokens, args.repeats = "2048", "1024", 8, 1

    from common import write_record

    cores = set(sorted(os.sched_getaffinity(0))[:2])
    with tempfile.TemporaryDirectory(prefix="bench_transformers_") as tmp:
        checkpoint, run = Path(tmp) / "hf", Path(tmp) / "run"
        make_checkpoint(checkpoint, args.vocab)
        convert = [sys.executable, "-m", "sleeplm", "convert", "--from-hf", str(checkpoint), "--out", str(run),
                   "--sleep.window", str(args.window), "--sleep.passes", str(args.passes),
                   "--sleep.eviction", args.eviction]  # fmt: skip
        print(" ".join(convert[1:]), flush=True)
        subprocess.run(convert, check=True)
        workers = {"torch": Worker("torch", checkpoint, args, cores), "jax": Worker("jax", run, args, cores)}
        try:
            results = {
                "model": qwen3_next_config(args.vocab),
                "sleep": {"window": args.window, "passes": args.passes, "eviction": args.eviction},
                "threads": {"cores": sorted(cores), "torch_threads": 2, "jax": "default CPU client on 2 pinned cores"},
                "prefill": [measure_prefill(workers, int(n), args.repeats) for n in args.prefill.split(",")],
            }
            prefilled = {int(n) for n in args.prefill.split(",")}
            results["decode"] = [
                measure_decode(workers, int(n), args.new_tokens, args.repeats, prefilled)
                for n in args.contexts.split(",")
            ]
        finally:
            for worker_process in workers.values():
                worker_process.close()
    results["targets"] = TARGETS
    results["met"] = {key: all(row["speedup"] >= target for row in results[key]) for key, target in TARGETS.items()}
    write_record(args, results)
    if args.out:
        plot(results, Path(args.out).with_suffix(".png"))


if __name__ == "__main__":
    main()
