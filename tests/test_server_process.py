"""`sleeplm serve` as a real process on a free port of 127.0.0.1, talked to with the `openai` client: completions
(whole and streamed) and chat against offline `generate`; sessions continued through `extra_body` and the
X-Session-Id header; the server killed with SIGKILL and restarted on the same --state-dir continues every session
from its last completed request (its next reply equals `generate` over the session's whole history); a client that
leaves mid-stream is logged as 499."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import jax
import pytest
from test_sleep import WINDOW, make_config, perturbed

from sleeplm import init_params
from sleeplm.data import TextConfig
from sleeplm.data.tokenizer import EOS, train_tokenizer
from sleeplm.experiment.schema import Experiment
from sleeplm.experiment.workdir import Workdir
from sleeplm.inference.generate import generate
from sleeplm.inference.streams import start_stream

pytestmark = pytest.mark.slow
openai = pytest.importorskip("openai")

VOCAB = 300  # a byte-level BPE: the 256 bytes, <pad>, <eos> and 42 merges
NEW = 8
CORPUS = "Once upon a time the quick brown fox slept, and sleeping it dreamt of windows and passes. " * 20
TEMPLATE = "{% for m in messages %}{{ m.role }}: {{ m.content }}{{ eos_token }}{% endfor %}assistant:"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny text run: a random model, its tokenizer, and a chat template that ends each turn with <eos>."""
    path = tmp_path_factory.mktemp("run") / "tiny-run"
    path.mkdir()
    tokenizer = train_tokenizer([CORPUS], VOCAB, path / "tokenizer.json")
    (path / "tokenizer_config.json").write_text(json.dumps({"chat_template": TEMPLATE, "eos_token": EOS}))
    config = make_config(2, "sliding", vocab_size=VOCAB)
    task = TextConfig(
        files=str(path / "*.txt"), tokenizer=str(path / "tokenizer.json"), vocab_size=VOCAB, window=WINDOW
    )
    experiment = Experiment(task, config)
    params = perturbed(init_params(jax.random.key(3), config), jax.random.key(4))
    workdir = Workdir(path)
    workdir.checkpoints().save_weights(params, experiment)
    workdir.write_experiment(experiment)
    codec = workdir.codec(experiment)
    return path, config, params, codec, tokenizer.token_to_id(EOS)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`python -m sleeplm serve` on a free port; its output in `log`."""

    def __init__(self, workdir: Path, state_dir: Path, log: Path) -> None:
        self.port, self.log = free_port(), log
        command = [sys.executable, "-m", "sleeplm", "serve", "--workdir", str(workdir), "--port", str(self.port),
                   "--state-dir", str(state_dir), "--slots", "2", "--host-sessions", "1"]  # fmt: skip
        with open(log, "w") as out:
            self.process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            assert self.process.poll() is None, f"the server exited:\n{log.read_text()}"
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.5)
        raise AssertionError(f"the server did not come up in 300 s:\n{log.read_text()}")

    def client(self):
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0, timeout=300)

    def stop(self, sig=signal.SIGTERM) -> None:
        self.process.send_signal(sig)
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def reference(run, histories: list[list[int]]) -> list[list[int]]:
    """Greedy `generate` over each history from a fresh stream, stopping at <eos> as the server does: the ids."""
    _, config, params, _, eos = run
    result = generate(
        params, start_stream(config, len(histories), jax.random.key(0)), histories, config,
        max_new_tokens=NEW, stop_tokens=[eos],
    )  # fmt: skip
    return [[int(t) for t in row[:n]] for row, n in zip(result.tokens, result.lengths, strict=True)]


def text_of(run, ids: list[int]) -> str:
    """The reply's text: its ids decoded, the <eos> that ended it left out."""
    _, _, _, codec, eos = run
    return codec.decode(ids[:-1] if ids and ids[-1] == eos else ids)


def test_the_served_model_answers_like_generate_and_its_sessions_survive_sigkill(run, tmp_path):
    path, _, _, codec, eos = run
    state, name = tmp_path / "state", path.name
    server = Server(path, state, tmp_path / "server1.log")
    try:
        client = server.client()
        prompt = "Once upon a time"
        expected = text_of(run, reference(run, [codec.encode(prompt)])[0])
        whole = client.completions.create(model=name, prompt=prompt, max_tokens=NEW, temperature=0)
        assert whole.choices[0].text == expected
        chunks = client.completions.create(model=name, prompt=prompt, max_tokens=NEW, temperature=0, stream=True)
        assert "".join(chunk.choices[0].text for chunk in chunks) == expected

        chat_ids = [*codec.encode("user: Hi there"), eos, *codec.encode("assistant:")]
        chat = client.chat.completions.create(
            model=name, messages=[{"role": "user", "content": "Hi there"}], max_tokens=NEW, temperature=0
        )
        assert chat.choices[0].message.content == text_of(run, reference(run, [chat_ids])[0])

        sessions = [httpx.post(f"{server.url}/v1/sessions").json()["id"] for _ in range(3)]  # 2 slots: offloaded
        histories = {s: [] for s in sessions}
        for turn, prompts in enumerate([["The quick", " brown", "Once"], [" fox", " slept", " upon"]]):
            for session, prompt in zip(sessions, prompts, strict=True):
                by_body, by_header = {"extra_body": {"session": session}}, {"extra_headers": {"X-Session-Id": session}}
                route = by_body if turn == 0 else by_header
                reply = client.completions.create(model=name, prompt=prompt, max_tokens=NEW, temperature=0, **route)
                histories[session] += codec.encode(prompt)
                expected = reference(run, [histories[session]])[0]
                assert reply.choices[0].text == text_of(run, expected), (session, turn)
                histories[session] += expected
        server.stop(signal.SIGKILL)

        server = Server(path, state, tmp_path / "server2.log")
        client = server.client()
        for session in sessions:
            assert httpx.get(f"{server.url}/v1/sessions/{session}").json()["tokens"] == len(histories[session])
            histories[session] += codec.encode(" and")
        expected = reference(run, [histories[s] for s in sessions])
        for session, ids in zip(sessions, expected, strict=True):
            reply = client.completions.create(
                model=name, prompt=" and", max_tokens=NEW, temperature=0, extra_body={"session": session}
            )
            assert reply.choices[0].text == text_of(run, ids), session

        body = {"model": name, "prompt": "Once", "max_tokens": 4000, "stream": True}
        with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=60) as response:
            lines = response.iter_lines()
            assert next(lines).startswith("data: ")
        deadline = time.monotonic() + 30
        while " 499 " not in server.log.read_text() and time.monotonic() < deadline:
            time.sleep(0.2)
        log = server.log.read_text()
        assert " 499 " in log and '"POST /v1/completions HTTP/1.1" 200' in log  # uvicorn's access log
        assert f"at {server.url}/v1" in log  # the startup line
    finally:
        server.stop()
