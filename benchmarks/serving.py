"""What the serving benchmarks share: a text run made without training (a BPE tokenizer and random weights at a
chosen size), a `sleeplm serve` process on a free port of 127.0.0.1, and a streaming completion timed per token."""

from __future__ import annotations

import contextlib
import itertools
import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import jax

import sleeplm
from sleeplm.core.parameters import init_params
from sleeplm.data.tokenizer import train_tokenizer
from sleeplm.experiment.workdir import Workdir
from sleeplm.training.presets import build_experiment


def make_run(path: Path, *, d_model: int, blocks: int, window: int, passes: int, vocab: int = 512) -> Workdir:
    """A text run (the `lm-cpu` preset at the given size) with random weights at step 0."""
    run = Workdir(path)
    layers = ",".join(["attn", "gdn"] * (blocks // 2))
    overrides = {"model.d_model": str(d_model), "model.layers": layers, "model.num_heads": str(max(1, d_model // 64)),
                 "sleep.window": str(window), "sleep.passes": str(passes), "task.vocab_size": str(vocab)}  # fmt: skip
    experiment = build_experiment("lm-cpu", overrides)
    run.write_experiment(experiment)
    texts = [path.read_text() for path in sorted(Path(sleeplm.__file__).parent.rglob("*.py"))]  # the package's code
    train_tokenizer(texts, experiment.config.model.vocab_size, run.tokenizer_path)
    run.checkpoints_path.mkdir(exist_ok=True)
    run.checkpoints().save_weights(init_params(jax.random.key(0), experiment.config), experiment)
    return run


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def server(workdir: Path, *options: str, log: Path | None = None) -> Iterator[tuple[str, subprocess.Popen]]:
    """A `sleeplm serve` process on 127.0.0.1 (its base URL and process), stopped on exit."""
    port = free_port()
    command = [sys.executable, "-m", "sleeplm", "serve", "--workdir", str(workdir), "--host", "127.0.0.1",
               "--port", str(port), *options]  # fmt: skip
    output = open(log, "w") if log else subprocess.DEVNULL  # noqa: SIM115 (closed below)
    process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"the server exited with {process.returncode}" + (f" (log: {log})" if log else ""))
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url + "/health", timeout=5).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise TimeoutError("the server did not come up within 600 s")
            time.sleep(0.5)
        yield url, process
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
        if log:
            output.close()


def rss_mib(process: subprocess.Popen) -> float:
    """The process's resident memory (MiB), from /proc."""
    for line in Path(f"/proc/{process.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc status")


def timed_completion(client: httpx.Client, body: dict, session: str | None = None) -> dict:
    """A streamed /v1/completions request, timed per token (each chunk's `logprobs.tokens`, so a token whose text is
    held back still counts): seconds to the first token and between tokens, the text and how the reply ended."""
    start = time.perf_counter()
    stamps, text, reason = [], [], None
    headers = {} if session is None else {"X-Session-Id": session}
    body = body | {"stream": True, "logprobs": 0}
    with client.stream("POST", "/v1/completions", json=body, headers=headers) as response:
        if response.status_code != 200:
            raise RuntimeError(f"{response.status_code}: {response.read().decode()}")
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            choice = json.loads(line[len("data: ") :])["choices"][0]
            now = time.perf_counter()
            stamps += [now] * len((choice.get("logprobs") or {}).get("tokens") or [])
            text.append(choice.get("text", ""))
            reason = choice.get("finish_reason") or reason
    gaps = [b - a for a, b in itertools.pairwise(stamps) if b > a]  # tokens that arrive in one chunk: one gap
    first = stamps[0] - start if stamps else None
    return {"ttft": first, "itl": gaps, "text": "".join(text), "tokens": len(stamps), "finish_reason": reason}
