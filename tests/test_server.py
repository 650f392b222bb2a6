"""The HTTP server (`sleeplm.inference.server`) in process, over the real scheduler and engine of a tiny random
model: replies against offline `generate` (greedy and seeded), prompt log-probs against `forward`, streamed replies
against whole ones, a session against one generation over its whole history, the chat template against a
hand-written prompt, every bad input against its OpenAI-shaped error (with the other sessions untouched), a client
that disconnects against a cancelled request; and the incremental text decoding (UTF-8 split across tokens, stop
strings) against decoding the whole reply."""

from __future__ import annotations

import asyncio
import json
import logging
import string
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from starlette.testclient import TestClient
from test_sleep import make_config, perturbed

from sleeplm import forward, init_params
from sleeplm.inference.engine import Engine
from sleeplm.inference.generate import Sampling, generate
from sleeplm.inference.scheduler import Failed, Finished, Request, Scheduler, key_data
from sleeplm.inference.server.app import create_app
from sleeplm.inference.streams import start_stream
from sleeplm.inference.text import TextStream

CHARS = string.ascii_lowercase + string.ascii_uppercase + " \n<|>.,!?:'-"  # one character per token id
LIMIT = 1000  # the server's max_tokens limit
NEW = 8  # tokens per reply: one compile bucket of `generate`
ROWS, BUCKET = 4, 32  # every offline reference is one `generate` call of this shape (one compile each sampling)
SAMPLED = Sampling(temperature=1.0, top_k=5)


class CharCodec:
    """Token id i is the character CHARS[i]."""

    def encode(self, text: str) -> list[int]:
        return [CHARS.index(c) for c in text]

    def decode(self, ids) -> str:
        return "".join(CHARS[int(i)] for i in ids)


CODEC = CharCodec()


@pytest.fixture(scope="module")
def model():
    config = make_config(2, "sliding", vocab_size=len(CHARS))
    return config, perturbed(init_params(jax.random.key(41), config), jax.random.key(42))


@pytest.fixture(scope="module")
def client(model):
    """A client of the server over a running scheduler (the model runs: its tests are slow, compiling it)."""
    config, params = model
    scheduler = Scheduler(Engine(params, config, slots=4), max_tokens_limit=LIMIT, decode=CODEC.decode).start()
    with TestClient(create_app(scheduler, CODEC, "tiny")) as client:
        client.scheduler = scheduler
        yield client
    scheduler.stop()


class Unstarted(Scheduler):
    """The scheduler, never started: it checks each request and queues it, and the request fails at once (nothing
    runs the model), so refusals are seen without compiling it and a request let through fails instead of hanging."""

    def submit(self, request, on_event):
        handle = super().submit(request, on_event)
        on_event(Failed(AssertionError(f"the request was accepted: {request}")))
        return handle


@pytest.fixture(scope="module")
def refusing():
    """A client of the server over an `Unstarted` scheduler with zero parameters."""
    config = make_config(2, "sliding", vocab_size=len(CHARS))
    shapes = jax.eval_shape(lambda: init_params(jax.random.key(0), config))
    params = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    scheduler = Unstarted(Engine(params, config, slots=1), max_tokens_limit=LIMIT, decode=CODEC.decode)
    with TestClient(create_app(scheduler, CODEC, "tiny")) as client:
        client.scheduler, client.zero_params = scheduler, params  # (`params` is the client's query string)
        yield client
    scheduler.stop()


GREEDY = Sampling()


def offline(model, prompts, seeds=None, sampling=GREEDY):
    """`generate`'s reply (NEW tokens) to each prompt, from a fresh stream seeded as the server seeds a request's
    (`seeds`: one per prompt), all in one call of a fixed shape."""
    config, params = model
    seeds = list(seeds or [0] * len(prompts))
    rows = [list(p) for p in prompts] + [[0] * BUCKET] * (ROWS - len(prompts))  # the last fixes the bucket
    keys = jax.random.wrap_key_data(jnp.asarray(np.stack([key_data(s) for s in seeds + [0] * (ROWS - len(seeds))])))
    result = generate(params, start_stream(config, ROWS, keys), rows, config, max_new_tokens=NEW, sampling=sampling)
    return [CODEC.decode(result.tokens[i, : result.lengths[i]]) for i in range(len(prompts))]


def complete(client, **body):
    response = client.post("/v1/completions", json={"max_tokens": NEW, "temperature": 0} | body)
    assert response.status_code == 200, response.text
    return response.json()


def events(response) -> list:
    """The JSON bodies of a server-sent event stream, which must end with `data: [DONE]`."""
    lines = [line for line in response.text.split("\n\n") if line]
    assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]", response.text
    return [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]


@pytest.mark.slow
def test_completions_equal_offline_generation_greedy_and_seeded(client, model):
    prompts = ["hello", "Sleep.", "ab"]
    greedy = [complete(client, prompt=p)["choices"][0] for p in prompts[:2]]
    as_ids = complete(client, prompt=CODEC.encode(prompts[2]))["choices"][0]
    expected = offline(model, [CODEC.encode(p) for p in prompts])
    assert [c["text"] for c in [*greedy, as_ids]] == expected
    assert all(c["finish_reason"] == "length" for c in greedy)
    batch = complete(client, prompt=[CODEC.encode(p) for p in prompts])  # one choice per prompt, as lm-eval sends
    assert [(c["index"], c["text"]) for c in batch["choices"]] == list(enumerate(expected))
    assert batch["usage"]["prompt_tokens"] == sum(map(len, prompts)) and batch["usage"]["completion_tokens"] == 3 * NEW

    seeds = [3, 3, 4]
    sampled = [
        complete(client, prompt=p, temperature=1.0, top_k=5, seed=s)["choices"][0]["text"]
        for p, s in zip(["hello", "hello", "hello"], seeds, strict=True)
    ]
    assert sampled == offline(model, [CODEC.encode("hello")] * 3, seeds, SAMPLED)
    assert sampled[0] == sampled[1] != sampled[2]


@pytest.mark.slow
def test_streaming_equals_the_whole_reply(client):
    body = {"prompt": "stream me", "temperature": 1.0, "seed": 7, "logprobs": 2}
    last = complete(client, **body)["choices"][0]["text"][-1]
    body["stop"] = [last + "~"]  # never generated ("~" is no token), but the reply's last character may begin it
    whole = complete(client, **body)
    chunks = events(client.post("/v1/completions", json={"max_tokens": NEW, "stream": True, **body}))
    choices = [c["choices"][0] for c in chunks]
    assert (
        "".join(c["text"] for c in choices) == whole["choices"][0]["text"] and whole["choices"][0]["text"][-1] == last
    )
    assert choices[-1]["text"] == last  # held back until the reply ended without the stop string
    assert choices[-1]["finish_reason"] == "length" and all(c["finish_reason"] is None for c in choices[:-1])
    streamed = {key: [v for c in choices for v in c["logprobs"][key]] for key in whole["choices"][0]["logprobs"]}
    expected = whole["choices"][0]["logprobs"]
    assert [streamed[key] for key in ("tokens", "text_offset")] == [expected[key] for key in ("tokens", "text_offset")]
    # the same tokens in another decode slot: log-probs equal to float32 rounding (the batch's rows differ by ulps)
    np.testing.assert_allclose(streamed["token_logprobs"], expected["token_logprobs"], rtol=1e-5)
    for top, wanted in zip(streamed["top_logprobs"], expected["top_logprobs"], strict=True):
        assert set(top) == set(wanted)
        np.testing.assert_allclose([top[k] for k in wanted], list(wanted.values()), rtol=1e-5)

    request = {"max_tokens": NEW, "stream": True, "stream_options": {"include_usage": True}, **body}
    usage = events(client.post("/v1/completions", json=request))[-1]
    assert usage["choices"] == [] and usage["usage"] == whole["usage"] == {
        "prompt_tokens": 9, "completion_tokens": NEW, "total_tokens": 9 + NEW,
    }  # fmt: skip


@pytest.mark.slow
def test_echo_with_logprobs_scores_the_prompt_as_forward_does(client, model):
    """What lm-evaluation-harness's local-completions sends to score a continuation (echo, logprobs=1, max_tokens
    0; newer versions ask for 1 token and drop its entry)."""
    config, params = model
    text = "The cat sat."
    ids = CODEC.encode(text)
    logprobs = np.asarray(jax.nn.log_softmax(forward(params, jnp.asarray([ids]), config)[0], axis=-1))
    lm_eval = {"model": "tiny", "prompt": [ids, ids], "temperature": 0, "logprobs": 1, "seed": 1234, "echo": True}
    for max_tokens in (0, 1):
        choices = complete(client, **lm_eval | {"max_tokens": max_tokens})["choices"]
        assert [c["index"] for c in choices] == [0, 1] and choices[0]["text"] == choices[1]["text"]
        first, second = (c["logprobs"]["token_logprobs"][1:] for c in choices)
        np.testing.assert_allclose(first, second, rtol=1e-5)
        choice = choices[0]
        scored = choice["logprobs"]
        assert choice["text"].startswith(text) and len(choice["text"]) == len(ids) + max_tokens
        assert scored["tokens"][: len(ids)] == list(text) and scored["text_offset"] == list(
            range(len(ids) + max_tokens)
        )
        assert scored["token_logprobs"][0] is None and scored["top_logprobs"][0] is None
        expected = [logprobs[i - 1, ids[i]] for i in range(1, len(ids))]
        np.testing.assert_allclose(scored["token_logprobs"][1 : len(ids)], expected, rtol=1e-4, atol=1e-5)
        for i, top in enumerate(scored["top_logprobs"][1 : len(ids)]):
            best = int(np.argmax(logprobs[i]))
            assert top[CHARS[best]] == pytest.approx(logprobs[i, best], rel=1e-4, abs=1e-5)
            assert set(top) == {CHARS[best], text[i + 1]}  # the top-1 alternative and the token itself


@pytest.mark.slow
def test_a_session_continued_over_three_requests_equals_one_generation_over_its_history(client, model):
    session = client.post("/v1/sessions").json()["id"]
    history, replies = "", []
    for i, prompt in enumerate(["Once", " upon", " a"]):  # 3 x (prompt + 8) tokens: windows of 6 fill and sleep
        body = {"prompt": prompt, "max_tokens": NEW, "temperature": 0}
        by_body, by_header = (body | {"session": session}, {}), (body, {"X-Session-Id": session})
        body, headers = by_body if i % 2 else by_header
        response = client.post("/v1/completions", json=body, headers=headers)
        reply = response.json()["choices"][0]["text"]
        history += prompt
        replies.append((history, reply))
        history += reply
    assert [reply for _, reply in replies] == offline(model, [CODEC.encode(h) for h, _ in replies])
    info = client.get(f"/v1/sessions/{session}").json()
    assert info["tokens"] == len(history) and info["busy"] is False
    assert client.delete(f"/v1/sessions/{session}").json() == {"id": session, "object": "session", "deleted": True}
    assert client.get(f"/v1/sessions/{session}").status_code == 404


@pytest.mark.slow
def test_stop_strings_end_the_reply_before_them(client, model):
    reply = offline(model, [CODEC.encode("hello")])[0]
    stop = reply[3:5]
    choice = complete(client, prompt="hello", stop=[stop, "never"])["choices"][0]
    assert choice == {"index": 0, "text": reply[: reply.index(stop)], "logprobs": None, "finish_reason": "stop"}
    chunks = events(
        client.post("/v1/completions", json={"prompt": "hello", "temperature": 0, "stop": stop, "stream": True})
    )
    assert "".join(c["choices"][0]["text"] for c in chunks) == choice["text"]


@pytest.mark.slow
def test_chat_renders_the_plain_template_and_streams_the_same_reply(client, model):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    prompt = "<|system|>\nBe brief.\n<|user|>\nHi!\n<|assistant|>\n"
    assert client.post("/tokenize", json={"messages": messages}).json()["tokens"] == CODEC.encode(prompt)
    body = {"messages": messages, "max_tokens": NEW, "temperature": 0}
    whole = client.post("/v1/chat/completions", json=body).json()
    reply = offline(model, [CODEC.encode(prompt)])[0]
    expected = reply.split("\n<|")[0]
    assert whole["choices"][0]["message"] == {"role": "assistant", "content": expected}
    assert whole["choices"][0]["finish_reason"] == ("stop" if "\n<|" in reply else "length")
    chunks = events(client.post("/v1/chat/completions", json=body | {"stream": True}))
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == expected
    assert chunks[-1]["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]


def test_models_health_and_the_tokenizer_endpoints(refusing):
    assert refusing.get("/health").json() == {"status": "ok"}
    assert [m["id"] for m in refusing.get("/v1/models").json()["data"]] == ["tiny"]
    tokenized = refusing.post("/tokenize", json={"prompt": "abC", "add_special_tokens": False}).json()
    assert tokenized == {"tokens": [0, 1, 28], "count": 3}
    assert refusing.post("/detokenize", json={"tokens": [0, 1, 28]}).json() == {"prompt": "abC"}
    info = refusing.get("/tokenizer_info").json()
    assert info["eos_token"] is None and "<|assistant|>" in info["chat_template"]


def bad_inputs(session, busy):
    """(method, path, JSON body or raw bytes, headers, status, param, words in the message): every input the
    server refuses; `session` exists, `busy` has a request queued."""
    completion = {"prompt": "hello", "max_tokens": 4}
    json_type = {"content-type": "application/json"}
    return [
        ("post", "/v1/completions", b'{"prompt": "a",', json_type, 400, None, "not valid JSON"),
        ("post", "/v1/completions", b'{"prompt": "a"}', {}, 400, None, "Content-Type: application/json"),
        ("post", "/v1/completions", completion | {"temprature": 0.5}, {}, 400, "temprature", "unknown field"),
        ("post", "/v1/chat/completions", {"messages": [{"role": "user", "content": "a", "x": 1}]}, {}, 400,
         "messages.0.x", "unknown field"),
        ("post", "/v1/completions", completion | {"prompt": [1, 64], "session": session}, {}, 400, "prompt",
         "outside the vocabulary"),
        ("post", "/v1/completions", completion | {"prompt": [[1], [2.5]]}, {}, 400, "prompt", "list of token ids"),
        ("post", "/v1/completions", completion | {"prompt": "hello~"}, {}, 400, "prompt", "cannot be encoded"),
        ("post", "/v1/completions", completion | {"temperature": -0.5}, {}, 400, "temperature", "greater than"),
        ("post", "/v1/completions", completion | {"max_tokens": LIMIT + 1, "session": session}, {}, 400,
         "max_tokens", f"[0, {LIMIT}]"),
        ("post", "/v1/completions", completion | {"prompt": [[1], [2]], "session": session}, {}, 400, "prompt",
         "one prompt"),
        ("post", "/v1/completions", completion | {"session": "nobody"}, {}, 404, "session", "does not exist"),
        ("post", "/v1/completions", completion, {"X-Session-Id": "nobody"}, 404, "session", "does not exist"),
        ("post", "/v1/completions", completion | {"session": "../etc"}, {}, 400, "session", "invalid"),
        ("post", "/v1/completions", completion | {"model": "gpt-4"}, {}, 404, "model", "does not exist"),
        ("post", "/v1/completions", completion | {"n": 2}, {}, 400, "n", "not supported"),
        ("post", "/detokenize", {"tokens": [3, -1]}, {}, 400, "tokens", "outside the vocabulary"),
        ("post", "/v1/sessions", {"id": session}, {}, 409, "id", "exists already"),
        ("get", "/v1/sessions/nobody", None, {}, 404, "session", "does not exist"),
        ("delete", "/v1/sessions/nobody", None, {}, 404, "session", "does not exist"),
        ("delete", f"/v1/sessions/{busy}", None, {}, 409, "session", "busy"),
    ]  # fmt: skip


def send_bad_inputs(client, session, busy):
    for method, path, body, headers, status, param, words in bad_inputs(session, busy):
        send = {"content": body} if isinstance(body, bytes) else {} if body is None else {"json": body}
        response = client.request(method.upper(), path, headers=headers, **send)
        error = response.json()["error"]
        assert (response.status_code, error["param"]) == (status, param), (path, body, response.text)
        assert words in error["message"] and error["type"] == "invalid_request_error", error


def test_bad_inputs_get_openai_errors_naming_the_field(refusing):
    session, busy = (refusing.post("/v1/sessions").json()["id"] for _ in range(2))
    refusing.scheduler.submit(Request((0,), 1, session=busy), lambda event: None)  # queued: busy from now on
    send_bad_inputs(refusing, session, busy)
    assert refusing.get(f"/v1/sessions/{session}").json()["tokens"] == 0


def test_a_prompt_too_long_for_no_eviction_is_a_400(refusing):
    config = make_config(2, "none", vocab_size=len(CHARS))
    scheduler = Unstarted(Engine(refusing.zero_params, config, slots=1, capacity=16), decode=CODEC.decode)
    scheduler.submit(Request((0,) * 9, 7), lambda event: None)  # fits exactly: queued (never run)
    with TestClient(create_app(scheduler, CODEC, "tiny")) as client:
        for prompt, max_tokens, field in ((10, 7, "max_tokens"), (17, 1, "prompt")):  # the reply or the prompt
            response = client.post("/v1/completions", json={"prompt": "x" * prompt, "max_tokens": max_tokens})
            assert response.status_code == 400 and response.json()["error"]["param"] == field
            assert "over the capacity of 16" in response.json()["error"]["message"]
    scheduler.stop()


@pytest.mark.slow
def test_bad_inputs_leave_the_sessions_they_name_untouched(client, model):
    session, busy = (client.post("/v1/sessions").json()["id"] for _ in range(2))
    first = complete(client, prompt="Keep", session=session)["choices"][0]["text"]
    done = threading.Event()
    client.scheduler.submit(Request((0,), LIMIT, session=busy), lambda e: isinstance(e, Finished) and done.set())
    send_bad_inputs(client, session, busy)
    assert done.wait(120)
    second = complete(client, prompt=" going", session=session)["choices"][0]["text"]
    assert [first, second] == offline(model, [CODEC.encode("Keep"), CODEC.encode("Keep" + first + " going")])


async def disconnecting(app, body: dict, after_chunks: int) -> list[bytes]:
    """Calls the ASGI app as a server would, and disconnects after `after_chunks` body chunks (0: at once)."""
    sent, gone = [], asyncio.Event()
    messages = [{"type": "http.request", "body": json.dumps(body).encode(), "more_body": False}]

    async def receive():
        if messages:
            return messages.pop()
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message):
        if message["type"] == "http.response.body" and message.get("body"):
            sent.append(message["body"])
            if len(sent) >= after_chunks:
                gone.set()

    if after_chunks == 0:
        asyncio.get_running_loop().call_later(0.2, gone.set)
    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.4"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": "/v1/completions", "raw_path": b"/v1/completions",
             "query_string": b"", "root_path": "", "headers": [(b"content-type", b"application/json")],
             "client": ("127.0.0.1", 5000), "server": ("127.0.0.1", 8000)}  # fmt: skip
    await asyncio.wait_for(app(scope, receive, send), 60)
    return sent


@pytest.mark.slow
@pytest.mark.parametrize("stream", [True, False])
def test_a_client_that_disconnects_has_its_request_cancelled(client, stream, caplog):
    session = client.post("/v1/sessions").json()["id"]
    body = {"prompt": "wait", "max_tokens": LIMIT, "session": session, "stream": stream}
    with caplog.at_level(logging.INFO, logger="sleeplm.server"):
        asyncio.run(disconnecting(client.app, body, after_chunks=2 if stream else 0))
    assert any(" 499 " in record.getMessage() for record in caplog.records)
    for _ in range(600):  # the scheduler ends the reply at its next step
        info = client.get(f"/v1/sessions/{session}").json()
        if not info["busy"]:
            break
        threading.Event().wait(0.05)
    assert not info["busy"] and info["tokens"] < len("wait") + LIMIT  # ended early (or before it began)


def push_all(stream: TextStream, ids) -> str:
    return "".join(stream.release() for _ in (stream.push(i) for i in ids)) + stream.release(final=True)


def byte_codec(pieces: list[bytes]):
    return lambda ids: b"".join(pieces[i] for i in ids).decode("utf-8", errors="replace")


def test_text_is_released_only_when_final_and_ends_before_a_stop_string():
    pieces = [b"a", b" ", b"\xc3", b"\xa9", b"\xe2\x82", b"\xac", b"b", b"\xff", b"Stop", b"S", b"t"]  # é, €, \xff
    decode = byte_codec(pieces)
    rng = np.random.default_rng(0)
    straddling = [[0, 2, 3, 1, 6, 0], [9, 10, 0], [0, 4, 5, 8]]  # "é b" over four tokens, "St" over two, "€" over two
    for ids in straddling + [list(rng.integers(0, len(pieces), rng.integers(1, 30))) for _ in range(200)]:
        stream = TextStream(decode)
        released = []
        for token in ids:
            stream.push(token)
            released.append(stream.release())
            assert not released[-1].endswith("\ufffd")  # a split character waits for the rest of it
        assert "".join(released) + stream.release(final=True) == decode(ids)
        for stop in ("St", "é b", "€"):
            whole = decode(ids)
            expected = whole[: whole.index(stop)] if stop in whole else whole
            assert push_all(TextStream(decode, stops=(stop,)), ids) == expected
        echoed = TextStream(decode, ids, echo=True, stops=("St",))  # an echoed prompt is never cut
        assert push_all(echoed, []) == decode(ids)


def test_a_reply_decodes_in_the_context_of_its_prompt():
    words = ["zero", "one", "two"]
    decode = lambda ids: " ".join(words[i] for i in ids)  # the whitespace vocabulary codec
    assert push_all(TextStream(decode, [1, 0, 1]), [2, 0]) == " two zero"
    assert push_all(TextStream(decode), [2, 0]) == "two zero"
    echo = TextStream(decode, [0, 1], echo=True)
    assert echo.prompt_offsets == [0, 4] and push_all(echo, [2]) == "zero one two"
