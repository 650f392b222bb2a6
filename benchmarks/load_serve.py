"""A load run against a real server: many concurrent clients, each its own session, many requests each (greedy and
seeded sampling, streamed and not), more sessions than slots and host memory hold (so sessions move between slots,
host memory and disk all the time). Afterwards every session's transcript is replayed offline with `generate` over
one stream, and the server's memory is read throughout.

    python benchmarks/load_serve.py [--clients 32] [--requests 50] [--out benchmarks/results/load_serve_cpu.json]

A reply counts as lost when its request failed or did not finish, and as crossed when its text differs from the
offline replay of its own session (a reply computed on another session's state, or on a stale one, differs).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import tempfile
import threading
import time
from pathlib import Path

import httpx
import jax
import numpy as np
from common import write_record
from serving import make_run, rss_mib, server

from sleeplm.inference.generate import Sampling, generate
from sleeplm.inference.server.chat import end_of_text
from sleeplm.inference.streams import start_stream

SAMPLED = {"temperature": 0.8, "top_k": 40, "top_p": 0.95}


def plan(client: int, requests: int, vocab: int) -> list[dict]:
    """The requests of one client: prompt ids, reply length, greedy or sampled (seeded on its first request)."""
    rng = np.random.default_rng(client)
    sampled = client % 2 == 1
    bodies = []
    for k in range(requests):
        body = {"prompt": [int(t) for t in rng.integers(0, vocab, int(rng.integers(1, 40)))],
                "max_tokens": int(rng.integers(1, 24)), "stream": bool(rng.integers(0, 2))}  # fmt: skip
        body |= SAMPLED if sampled else {"temperature": 0}
        if sampled and k == 0:
            body["seed"] = client
        bodies.append(body)
    return bodies


def run_client(url: str, bodies: list[dict]) -> dict:
    with httpx.Client(base_url=url, timeout=600) as client:
        session = client.post("/v1/sessions").json()["id"]
        replies = []
        for body in bodies:
            body = body | {"session": session}
            try:
                replies.append(complete(client, body))
            except (httpx.HTTPError, RuntimeError, KeyError) as error:
                replies.append({"error": repr(error)})
        return {"session": session, "replies": replies}


def complete(client: httpx.Client, body: dict) -> dict:
    if not body["stream"]:
        response = client.post("/v1/completions", json=body)
        if response.status_code != 200:
            raise RuntimeError(f"{response.status_code}: {response.text}")
        choice = response.json()["choices"][0]
        return {"text": choice["text"], "finish_reason": choice["finish_reason"]}
    text, reason = [], None
    with client.stream("POST", "/v1/completions", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"{response.status_code}: {response.read().decode()}")
        for line in response.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                choice = json.loads(line[len("data: ") :])["choices"][0]
                text.append(choice.get("text", ""))
                reason = choice.get("finish_reason") or reason
    return {"text": "".join(text), "finish_reason": reason}


def replay(run, plans: dict[int, list[dict]]) -> dict[int, list[str]]:
    """Each client's replies as offline generation over one stream gives them."""
    experiment = run.experiment()
    config, codec = experiment.config, run.codec(experiment)
    params, _ = run.restore_params(experiment)
    stops = end_of_text(run.path, experiment.task)  # where the server ends every reply of the run
    texts = {}
    for client, bodies in plans.items():
        stream = start_stream(config, 1, jax.random.key(bodies[0].get("seed", 0)))
        texts[client] = []
        for body in bodies:
            sampling = Sampling(body["temperature"], body.get("top_k"), body.get("top_p", 1.0))
            result = generate(params, stream, [body["prompt"]], config, max_new_tokens=body["max_tokens"],
                              sampling=sampling, stop_tokens=stops)  # fmt: skip
            reply = [int(t) for t in result.tokens[0, : result.lengths[0]]]
            texts[client].append(codec.decode(reply[:-1] if reply[-1] in stops else reply))  # text ends before a stop
            stream = result.stream
    return texts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--requests", type=int, default=50)
    parser.add_argument("--slots", type=int, default=8)
    parser.add_argument("--host-sessions", type=int, default=8)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        run = make_run(scratch / "run", d_model=128, blocks=2, window=32, passes=2)
        vocab = run.experiment().config.model.vocab_size
        plans = {c: plan(c, args.requests, vocab) for c in range(args.clients)}
        options = ("--slots", str(args.slots), "--host-sessions", str(args.host_sessions),
                   "--state-dir", str(scratch / "state"))  # fmt: skip
        memory, done = [], threading.Event()
        with server(run.path, *options, log=scratch / "server.log") as (url, process):

            def watch() -> None:
                while not done.wait(1.0):
                    memory.append((time.monotonic() - start, rss_mib(process)))

            start = time.monotonic()
            watcher = threading.Thread(target=watch, daemon=True)
            watcher.start()
            with concurrent.futures.ThreadPoolExecutor(args.clients) as pool:
                served = dict(zip(plans, pool.map(lambda c: run_client(url, plans[c]), plans), strict=True))
            seconds = time.monotonic() - start
            done.set()
            watcher.join()
        expected = replay(run, plans)
    lost = [(c, k) for c, r in served.items() for k, reply in enumerate(r["replies"]) if "error" in reply]
    crossed = [{"client": c, "request": k, "served": reply, "offline": expected[c][k]}
               for c, r in served.items() for k, reply in enumerate(r["replies"])
               if "error" not in reply and reply["text"] != expected[c][k]]  # fmt: skip
    rss = [m for _, m in memory]
    tenth = max(1, len(rss) // 10)
    memory_summary = {"first_tenth_median": float(np.median(rss[:tenth])), "max": max(rss),
                      "last_tenth_median": float(np.median(rss[-tenth:]))}  # fmt: skip
    results = {"requests": args.clients * args.requests, "seconds": seconds, "lost": len(lost), "crossed": len(crossed),
               "lost_examples": lost[:10], "crossed_examples": crossed[:10], "rss_mib": memory_summary}  # fmt: skip
    print(json.dumps(results))
    results["rss_mib_samples"] = memory
    write_record(args, results)


if __name__ == "__main__":
    main()
