"""The server under a real HTTP client (`sleeplm serve` in its own process, httpx streaming), each figure a ratio
against a baseline measured in the same run:

1. background sleep: the turn after a reply whose last token filled the window (slept on while the client was idle)
   against the same turn after a reply that did not fill it: p50 / p99 time to first token and inter-token latency
   (target ratio <= 1.05); then the same with the next turn sent at once (it waits for the sleep: reported);
2. throughput with 1, 8 and 32 concurrent sessions (generated tokens/s and p99 inter-token latency): what continuous
   batching buys over one session at a time;
3. memory per idle session after 1k and 100k tokens of history: the session's stored state (bytes, as the server
   reports it and as its file on disk) and the server's RSS (target ratio <= 1.05).

    python benchmarks/bench_serve.py [--out benchmarks/results/serve_cpu.json] [--quick]

The model is a text run with random weights (`serving.make_run`): latency does not depend on the weights. Prompts
are token ids, so every turn has exactly the length it is meant to have.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
from common import write_record
from serving import make_run, rss_mib, server, timed_completion


def percentiles(values: list[float]) -> dict:
    values = np.asarray(values, float)
    return {"p50": float(np.percentile(values, 50)), "p99": float(np.percentile(values, 99)), "n": len(values)}


def ids(rng, n: int, vocab: int) -> list[int]:
    return [int(t) for t in rng.integers(0, vocab, n)]


def new_session(client: httpx.Client) -> str:
    response = client.post("/v1/sessions")
    response.raise_for_status()
    return response.json()["id"]


def turn(client, session, prompt, max_tokens):
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
    return timed_completion(client, body, session)


def background_sleep(client, args, vocab: int) -> dict:
    """Turn 2 after a first turn that fills the window exactly (filled) or leaves it half full (control)."""
    rng = np.random.default_rng(0)
    window, reply, second = args.window, args.reply, args.second_prompt
    results = {}
    for pause_name, pause in (("idle", args.idle), ("at_once", 0.0)):
        samples = {"filled": {"ttft": [], "itl": []}, "control": {"ttft": [], "itl": []}}
        for repeat in range(args.repeats + 1):  # the first round is a warm-up, not counted
            for case, first_prompt in (("filled", window - reply), ("control", window // 2 - reply)):
                while True:  # a first turn the end of text stopped early would not fill the window: draw again
                    session = new_session(client)
                    if turn(client, session, ids(rng, first_prompt, vocab), reply)["finish_reason"] == "length":
                        break
                    client.delete(f"/v1/sessions/{session}")
                time.sleep(pause)
                timed = turn(client, session, ids(rng, second, vocab), reply)
                if repeat:
                    samples[case]["ttft"].append(timed["ttft"])
                    samples[case]["itl"] += timed["itl"]
                client.delete(f"/v1/sessions/{session}")
        summary = {case: {k: percentiles(v) for k, v in s.items()} for case, s in samples.items()}
        for metric in ("ttft", "itl"):
            for q in ("p50", "p99"):
                filled, control = summary["filled"][metric][q], summary["control"][metric][q]
                summary[f"{metric}_{q}_ratio"] = filled / control
        summary["ttft_p50_extra_ms"] = 1e3 * (summary["filled"]["ttft"]["p50"] - summary["control"]["ttft"]["p50"])
        results[pause_name] = summary
        print(pause_name, {k: round(v, 3) for k, v in summary.items() if k.endswith(("ratio", "ms"))})
    return results


def throughput(url: str, args, vocab: int) -> dict:
    results = {}
    for concurrency in args.concurrency:

        def client_run(index: int, concurrency=concurrency) -> dict:
            rng = np.random.default_rng(index)
            with httpx.Client(base_url=url, timeout=600) as client:
                session = new_session(client)
                tokens, gaps = 0, []
                for _ in range(args.requests):
                    timed = turn(client, session, ids(rng, 16, vocab), args.reply)
                    tokens += timed["tokens"]
                    gaps += timed["itl"]
                client.delete(f"/v1/sessions/{session}")
                return {"tokens": tokens, "itl": gaps}

        start = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
            runs = list(pool.map(client_run, range(concurrency)))
        seconds = time.perf_counter() - start
        tokens = sum(r["tokens"] for r in runs)
        gaps = [g for r in runs for g in r["itl"]]
        results[concurrency] = {"tokens_per_s": tokens / seconds, "seconds": seconds, "tokens": tokens,
                                "itl": percentiles(gaps)}  # fmt: skip
        print(
            f"{concurrency} sessions: {tokens / seconds:.1f} tokens/s, p99 ITL {percentiles(gaps)['p99'] * 1e3:.1f} ms"
        )
    one = results[args.concurrency[0]]["tokens_per_s"]
    for concurrency in args.concurrency:
        results[concurrency]["speedup_over_one_at_a_time"] = results[concurrency]["tokens_per_s"] / one
    return results


def idle_memory(client, process, state_dir: Path, args, vocab: int) -> dict:
    rng = np.random.default_rng(1)
    results = {"rss_mib_before": rss_mib(process)}
    for history in args.histories:
        session = new_session(client)
        fed = 0
        while fed < history:
            piece = min(args.piece, history - fed)
            body = {"prompt": ids(rng, piece, vocab), "max_tokens": 0}
            response = client.post("/v1/completions", json=body, headers={"X-Session-Id": session})
            response.raise_for_status()
            fed += piece
        info = client.get(f"/v1/sessions/{session}").json()
        assert info["tokens"] == history, info
        file = state_dir / "sessions" / f"{session}.npz"
        results[f"history_{history}"] = {"state_bytes": info["state_bytes"], "file_bytes": file.stat().st_size,
                            "rss_mib": rss_mib(process)}  # fmt: skip
    small, large = (results[f"history_{h}"] for h in args.histories)
    results["state_ratio"] = large["state_bytes"] / small["state_bytes"]
    results["file_ratio"] = large["file_bytes"] / small["file_bytes"]
    print({k: v for k, v in results.items() if "ratio" in k})
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--quick", action="store_true", help="fewer repeats and requests (a smoke run)")
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--passes", type=int, default=2)
    parser.add_argument("--reply", type=int, default=32, help="tokens per reply")
    parser.add_argument("--second-prompt", type=int, default=16)
    parser.add_argument("--idle", type=float, default=1.0, help="seconds the client waits between turns")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--concurrency", type=lambda s: [int(c) for c in s.split(",")], default=[1, 8, 32])
    parser.add_argument("--requests", type=int, default=6, help="requests per client in the throughput runs")
    parser.add_argument("--histories", type=lambda s: [int(c) for c in s.split(",")], default=[1024, 100_000])
    parser.add_argument("--piece", type=int, default=8192, help="prompt tokens per request when building history")
    args = parser.parse_args()
    if args.quick:
        args.repeats, args.requests, args.concurrency, args.histories = 3, 2, [1, 4], [1024, 8192]
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        run = make_run(scratch / "run", d_model=args.d_model, blocks=args.blocks, window=args.window,
                       passes=args.passes)  # fmt: skip
        vocab = run.experiment().config.model.vocab_size
        slots = str(max(args.concurrency))
        options = ("--slots", slots, "--state-dir", str(scratch / "state"), "--max-tokens-limit", "4096")
        log = scratch / "server.log"
        with server(run.path, *options, log=log) as (url, process), httpx.Client(base_url=url, timeout=600) as client:
            turn(client, None, ids(np.random.default_rng(9), 8, vocab), 2)  # compile the common shapes
            results = {"background_sleep": background_sleep(client, args, vocab)}
            results["throughput"] = throughput(url, args, vocab)
            results["idle_memory"] = idle_memory(client, process, scratch / "state", args, vocab)
    write_record(args, results)
    if args.out:
        plot(results, args.out.with_suffix(".png"))


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (latency, rate) = plt.subplots(1, 2, figsize=(11, 4))
    labels, values = [], []
    for pause in ("idle", "at_once"):
        for case in ("control", "filled"):
            for metric in ("ttft", "itl"):
                labels.append(f"{pause}\n{case}\n{metric}")
                values.append(1e3 * results["background_sleep"][pause][case][metric]["p50"])
    latency.bar(range(len(values)), values)
    latency.set_xticks(range(len(values)), labels, fontsize=7)
    latency.set_ylabel("p50 ms")
    latency.set_title("turn after a reply that filled the window (filled) or not")
    levels = [c for c in results["throughput"]]
    rate.plot(levels, [results["throughput"][c]["tokens_per_s"] for c in levels], marker="o")
    rate.set_xlabel("concurrent sessions")
    rate.set_ylabel("generated tokens/s")
    rate.set_title("continuous batching")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
