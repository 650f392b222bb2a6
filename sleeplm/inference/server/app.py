"""`create_app`: the OpenAI-compatible HTTP API over a `Scheduler` (FastAPI).

Endpoints: `POST /v1/completions`, `POST /v1/chat/completions` (both stream as server-sent events ending with
`data: [DONE]`), `GET /v1/models`, `GET /health`, `POST /tokenize`, `POST /detokenize`, `GET /tokenizer_info`
(vLLM's shapes: lm-evaluation-harness tokenizes through them), and sessions: `POST /v1/sessions`,
`GET /v1/sessions/{id}`, `DELETE /v1/sessions/{id}`.

A request continues a session when it names one, in the body field `session` (the openai client sends it with
`extra_body={"session": ID}`) or the header `X-Session-Id`; when both are given the body field wins. Its prompt is
then only what follows the session's history (for chat: only the new messages), and its reply joins the history.
Every error is a JSON body in OpenAI's shape, {"error": {"message", "type", "param", "code"}}, with a 4xx status
(400 bad input, 404 unknown session or model, 409 a busy session); a client that goes away mid-reply has its
request cancelled (logged as 499).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator

import anyio
from fastapi import FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from jinja2.exceptions import TemplateError
from starlette.exceptions import HTTPException

from sleeplm.inference.generate import Sampling
from sleeplm.inference.scheduler import Request as Job
from sleeplm.inference.scheduler import RequestError, SessionBusy, SessionExists, UnknownSession
from sleeplm.inference.server import protocol
from sleeplm.inference.server.chat import PLAIN_TEMPLATE, ChatTemplate
from sleeplm.inference.server.replies import Choice, Delta, Replies, ReplyFailed
from sleeplm.inference.sessions import check_session_id

log = logging.getLogger("sleeplm.server")
SESSION_HEADER = "X-Session-Id"


class ApiError(Exception):
    """A request the server refuses: HTTP `status`, and the OpenAI error's `message`, `param` and `code`."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def _api_error(error: Exception) -> ApiError:
    """The HTTP error of an exception the scheduler raised or a request event carried."""
    if isinstance(error, ApiError):
        return error
    if isinstance(error, RequestError):
        return ApiError(400, error.message, error.field, "invalid_value")
    if isinstance(error, UnknownSession):
        return ApiError(404, f"session {error.session!r} does not exist", "session", "session_not_found")
    if isinstance(error, SessionBusy):
        return ApiError(409, f"session {error.session!r} is busy with another request", "session", "session_busy")
    if isinstance(error, SessionExists):
        return ApiError(409, str(error), "id", "session_exists")
    return ApiError(500, f"{type(error).__name__}: {error}", None, "internal_error")


def _error_response(error: ApiError) -> JSONResponse:
    kind = "invalid_request_error" if error.status < 500 else "server_error"
    return JSONResponse(protocol.error_body(error.message, error.param, error.code, kind), status_code=error.status)


def _validation_error(error: RequestValidationError) -> ApiError:
    """The first problem pydantic found, naming the field by its dotted path (e.g. `messages.0.role`)."""
    first = error.errors()[0]
    kind, where = first.get("type"), ".".join(str(part) for part in first.get("loc", ())[1:])
    if kind == "json_invalid":
        return ApiError(
            400, f"the body is not valid JSON: {first.get('ctx', {}).get('error', '')}", None, "invalid_json"
        )
    if not where:
        return ApiError(
            400, "the body must be a JSON object sent as Content-Type: application/json", None, "invalid_json"
        )
    if kind == "extra_forbidden":
        return ApiError(400, f"unknown field {where!r}", where, "unknown_field")
    message = first["msg"].removeprefix("Value error, ")
    return ApiError(400, f"{where}: {message}", where, "invalid_value")


class EventStream(StreamingResponse):
    """Server-sent events whose request is cancelled (`on_abandon`) when they end before their last event: the
    client went away. The disconnect is listened for whatever ASGI version the server speaks (Starlette listens
    only below 2.4, and otherwise notices at its next write)."""

    def __init__(self, content: AsyncIterator[str], on_abandon) -> None:
        super().__init__(content, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.on_abandon = on_abandon

    async def __call__(self, scope, receive, send) -> None:
        completed = False

        async def stream() -> None:
            nonlocal completed
            with contextlib.suppress(OSError):  # the client went away while we wrote
                await self.stream_response(send)
                completed = True
            group.cancel_scope.cancel()

        try:
            async with anyio.create_task_group() as group:
                group.start_soon(stream)
                await self.listen_for_disconnect(receive)
                group.cancel_scope.cancel()
        finally:
            await self.body_iterator.aclose()
            if not completed:
                self.on_abandon()


def _sse(body: dict) -> str:
    return f"data: {json.dumps(body)}\n\n"


async def _disconnected(request: Request) -> None:
    """Returns when the client disconnects (the body has been read: the next message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


class Server:
    """The handlers' shared state: the scheduler, the codec, the model's name, the chat template, the token ids
    that end every reply (the model's end of text)."""

    def __init__(self, scheduler, codec, model_name: str, chat: ChatTemplate, stop_tokens: tuple[int, ...]) -> None:
        self.scheduler, self.codec, self.model_name = scheduler, codec, model_name
        self.chat, self.stop_tokens = chat, stop_tokens

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            message = f"model {model!r} does not exist: this server serves {self.model_name!r}"
            raise ApiError(404, message, "model", "model_not_found")

    def encode(self, text: str, param: str) -> list[int]:
        try:
            return list(self.codec.encode(text))
        except (ValueError, KeyError) as error:  # e.g. a word outside a whitespace vocabulary
            raise ApiError(400, f"{param} cannot be encoded: {error}", param, "invalid_value") from None

    def chat_ids(self, messages: list[protocol.Message]) -> list[int]:
        try:
            text = self.chat.render([{"role": m.role, "content": m.text()} for m in messages])
        except TemplateError as error:
            raise ApiError(
                400, f"the chat template refused the messages: {error}", "messages", "invalid_value"
            ) from None
        return self.chat.ids(text, lambda piece: self.encode(piece, "messages"))

    async def call(self, fn, *args):
        """`fn(*args)` of the scheduler, off the event loop; its refusals as HTTP errors."""
        try:
            return await asyncio.to_thread(fn, *args)
        except (RequestError, UnknownSession, SessionBusy, SessionExists) as error:
            raise _api_error(error) from None

    def job(
        self, body: protocol.Sampled, prompt, max_tokens: int, session, stop_tokens=(), stop_strings=(), **logprobs
    ):
        sampling = Sampling(body.temperature, body.top_k, body.top_p)
        stops = self.stop_tokens + tuple(stop_tokens)
        strings = body.stop_strings() + tuple(stop_strings)
        return Job(tuple(prompt), max_tokens, sampling, stops, strings, body.seed, session, **logprobs)

    def choice(self, index: int, job: Job, echo: bool) -> Choice:
        return Choice(
            index, self.codec.decode, job.prompt, echo=echo, stop_strings=job.stop_strings, stop_tokens=job.stop_tokens
        )

    async def submit(self, jobs: list[Job], replies: Replies) -> list:
        """Submits every job (choice i's events go to `replies`); all or none: one refused cancels the others."""
        handles = []
        try:
            for index, job in enumerate(jobs):
                handles.append(await self.call(self.scheduler.submit, job, replies.on_event(index)))
        except ApiError:
            for handle in handles:
                self.scheduler.cancel(handle)
            raise
        return handles

    def cancel(self, request: Request, handles: list) -> None:
        for handle in handles:
            self.scheduler.cancel(handle)
        client = f"{request.client.host}:{request.client.port}" if request.client else "-"
        log.info('%s - "%s %s" 499 client disconnected, request cancelled', client, request.method, request.url.path)

    async def collect(self, request: Request, replies: Replies, handles: list) -> list[list[Delta]] | None:
        """Every delta of every choice; None when the client went away first (its requests are cancelled)."""

        async def gather() -> list[list[Delta]]:
            per_choice: list[list[Delta]] = [[] for _ in replies.choices]
            async for delta in replies.deltas():
                per_choice[delta.index].append(delta)
            return per_choice

        work, watch = asyncio.ensure_future(gather()), asyncio.ensure_future(_disconnected(request))
        try:
            done, _ = await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watch.cancel()
        if work not in done:
            work.cancel()
            self.cancel(request, handles)
            return None
        try:
            return work.result()
        except ReplyFailed as failed:
            raise _api_error(failed.error) from None

    async def stream(self, replies: Replies, chunks) -> AsyncIterator[str]:
        """Server-sent events: `chunks(delta)` gives each delta's chunk bodies; an error after the stream began is
        an `{"error": ...}` event; then `data: [DONE]`."""
        try:
            async for delta in replies.deltas():
                for body in chunks(delta):
                    yield _sse(body)
        except ReplyFailed as failed:
            error = _api_error(failed.error)
            kind = "invalid_request_error" if error.status < 500 else "server_error"
            yield _sse(protocol.error_body(error.message, error.param, error.code, kind))
        yield "data: [DONE]\n\n"

    def event_stream(self, request: Request, handles: list, events: AsyncIterator[str]) -> EventStream:
        return EventStream(events, on_abandon=lambda: self.cancel(request, handles))


def _session(body_session: str | None, header: str | None) -> str | None:
    """The session a request continues: the body's `session` field, else the X-Session-Id header."""
    if body_session is not None or header is None:
        return body_session
    try:
        return check_session_id(header)
    except ValueError as error:
        raise ApiError(400, str(error), SESSION_HEADER, "invalid_value") from None


def _usage_chunk(body: protocol.Sampled, delta: Delta, replies: Replies) -> dict | None:
    """The usage of the whole request, once its last choice finished, when `stream_options.include_usage`."""
    wanted = body.stream_options is not None and body.stream_options.include_usage
    done = delta.finish_reason is not None and len(replies.finished) == len(replies.choices)
    return protocol.usage(replies.finished) if wanted and done else None


def _cancelled() -> JSONResponse:
    """What a request whose client went away answers (nobody reads it; the status is for the access log)."""
    return JSONResponse(protocol.error_body("the client disconnected", None, "cancelled"), status_code=499)


def create_app(scheduler, codec, model_name: str, *, chat: ChatTemplate | None = None, stop_tokens=()) -> FastAPI:
    """The API over `scheduler` (started and stopped by the caller), encoding and decoding text with `codec`
    (`.encode(str) -> ids`, `.decode(ids) -> str`), serving the model `model_name`. `chat`: the chat template
    (default: the plain one); `stop_tokens`: ids that end every reply (the model's end-of-text token)."""
    chat = chat or ChatTemplate(PLAIN_TEMPLATE)
    server = Server(scheduler, codec, model_name, chat, tuple(int(t) for t in stop_tokens))
    app = FastAPI(title="sleeplm", version="1")

    @app.exception_handler(ApiError)
    async def _on_api_error(request: Request, error: ApiError) -> JSONResponse:
        return _error_response(error)

    @app.exception_handler(RequestValidationError)
    async def _on_validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        return _error_response(_validation_error(error))

    @app.exception_handler(HTTPException)
    async def _on_http_error(request: Request, error: HTTPException) -> JSONResponse:
        return _error_response(ApiError(error.status_code, str(error.detail)))

    @app.exception_handler(Exception)
    async def _on_unexpected(request: Request, error: Exception) -> JSONResponse:
        log.exception("internal error on %s %s", request.method, request.url.path)
        return _error_response(_api_error(error))

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models() -> dict:
        card = {"id": model_name, "object": "model", "created": 0, "owned_by": "sleeplm"}
        return {"object": "list", "data": [card]}

    @app.post("/tokenize")
    async def tokenize(body: protocol.TokenizeRequest) -> dict:
        server.check_model(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise ApiError(400, "give either prompt (text) or messages (chat)", "prompt", "invalid_value")
        ids = server.encode(body.prompt, "prompt") if body.prompt is not None else server.chat_ids(body.messages)
        return {"tokens": ids, "count": len(ids)}

    @app.post("/detokenize")
    async def detokenize(body: protocol.DetokenizeRequest) -> dict:
        server.check_model(body.model)
        vocab = scheduler.config.model.vocab_size
        bad = [t for t in body.tokens if not 0 <= t < vocab]
        if bad:
            raise ApiError(400, f"token id {bad[0]} is outside the vocabulary [0, {vocab})", "tokens", "invalid_value")
        return {"prompt": codec.decode(body.tokens)}

    @app.get("/tokenizer_info")
    async def tokenizer_info() -> dict:
        """What lm-evaluation-harness's remote tokenizer reads (with /tokenize and /detokenize)."""
        eos = codec.decode(server.stop_tokens[:1]) if server.stop_tokens else None
        return {"eos_token": eos, "bos_token": None, "pad_token": None, "chat_template": chat.source}

    @app.post("/v1/completions")
    async def completions(body: protocol.CompletionRequest, request: Request, x_session_id: str | None = Header(None)):
        server.check_model(body.model)
        session = _session(body.session, x_session_id)
        prompts = [p if isinstance(p, list) else server.encode(p, "prompt") for p in body.prompts()]
        if session is not None and len(prompts) > 1:
            raise ApiError(400, "a session continues one stream: give one prompt", "prompt", "invalid_value")
        scored = body.logprobs if body.echo else None
        jobs = [server.job(body, ids, body.max_tokens, session, logprobs=body.logprobs, prompt_logprobs=scored)
                for ids in prompts]  # fmt: skip
        replies = Replies(scored is not None)
        handles = await server.submit(jobs, replies)
        replies.choices = [server.choice(i, job, body.echo) for i, job in enumerate(jobs)]
        reply_id, created, wants = protocol.new_id("cmpl"), protocol.now(), body.logprobs is not None
        decode = codec.decode

        def body_of(choices: list[dict], usage: dict | None) -> dict:
            return protocol.completion(reply_id, created, model_name, choices, usage)

        if body.stream:

            def chunks(delta: Delta) -> list[dict]:
                out = []
                if delta.text or delta.finish_reason or (wants and delta.tokens):
                    logprobs = protocol.completion_logprobs(delta.tokens, decode) if wants else None
                    choice = protocol.completion_choice(delta.index, delta.text, logprobs, delta.finish_reason)
                    out.append(body_of([choice], None))
                usage = _usage_chunk(body, delta, replies)
                return out if usage is None else [*out, body_of([], usage)]

            return server.event_stream(request, handles, server.stream(replies, chunks))

        per_choice = await server.collect(request, replies, handles)
        if per_choice is None:
            return _cancelled()
        choices = []
        for index, deltas in enumerate(per_choice):
            logprobs = protocol.completion_logprobs([t for d in deltas for t in d.tokens], decode) if wants else None
            text = "".join(d.text for d in deltas)
            choices.append(protocol.completion_choice(index, text, logprobs, deltas[-1].finish_reason))
        return body_of(choices, protocol.usage(replies.finished))

    @app.post("/v1/chat/completions")
    async def chat_completions(body: protocol.ChatRequest, request: Request, x_session_id: str | None = Header(None)):
        server.check_model(body.model)
        session = _session(body.session, x_session_id)
        ids = server.chat_ids(body.messages)
        limit = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        max_tokens = scheduler.max_tokens_limit if limit is None else limit
        top = (body.top_logprobs or 0) if body.logprobs else None
        job = server.job(body, ids, max_tokens, session, chat.stop_tokens, chat.stop_strings, logprobs=top)
        replies = Replies()
        handles = await server.submit([job], replies)
        replies.choices = [server.choice(0, job, echo=False)]
        reply_id, created, decode = protocol.new_id("chatcmpl"), protocol.now(), codec.decode

        def body_of(choices: list[dict], usage: dict | None, chunk: bool) -> dict:
            return protocol.chat(reply_id, created, model_name, choices, usage, chunk)

        if body.stream:

            def chunks(delta: Delta) -> list[dict]:
                out = []
                if delta.text or delta.finish_reason or (body.logprobs and delta.tokens):
                    logprobs = protocol.chat_logprobs(delta.tokens, decode) if body.logprobs else None
                    content = {"content": delta.text} if delta.text or not delta.finish_reason else {}
                    out.append(body_of([protocol.chat_delta(0, content, logprobs, delta.finish_reason)], None, True))
                usage = _usage_chunk(body, delta, replies)
                return out if usage is None else [*out, body_of([], usage, True)]

            async def events() -> AsyncIterator[str]:
                opening = protocol.chat_delta(0, {"role": "assistant", "content": ""}, None, None)
                yield _sse(body_of([opening], None, True))
                async for event in server.stream(replies, chunks):
                    yield event

            return server.event_stream(request, handles, events())

        per_choice = await server.collect(request, replies, handles)
        if per_choice is None:
            return _cancelled()
        deltas = per_choice[0]
        logprobs = protocol.chat_logprobs([t for d in deltas for t in d.tokens], decode) if body.logprobs else None
        choice = protocol.chat_choice(0, "".join(d.text for d in deltas), logprobs, deltas[-1].finish_reason)
        return body_of([choice], protocol.usage(replies.finished), False)

    @app.post("/v1/sessions")
    async def create_session(body: protocol.SessionRequest | None = None) -> dict:
        session = await server.call(scheduler.create_session, None if body is None else body.id)
        return {"id": session, "object": "session"}

    @app.get("/v1/sessions/{session}")
    async def session_info(session: str) -> dict:
        return {"id": session, "object": "session", **await server.call(scheduler.session_info, session)}

    @app.delete("/v1/sessions/{session}")
    async def delete_session(session: str) -> dict:
        await server.call(scheduler.delete_session, session)
        return {"id": session, "object": "session", "deleted": True}

    return app
