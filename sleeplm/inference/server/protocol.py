"""The OpenAI wire format: request bodies (pydantic models that forbid unknown fields, so a misspelt option is a 400
naming it rather than silently ignored) and the response, chunk and error bodies built from a reply's deltas.

Beyond OpenAI's fields: `top_k` (as vLLM has it) and `session` (continue a server-side session; see
`sleeplm.inference.server.app`).
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from sleeplm.inference.server.replies import Delta, Logprob
from sleeplm.inference.sessions import check_session_id

MAX_LOGPROBS = 5  # alternatives per token, as OpenAI allows


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(Strict):
    include_usage: bool = False


class Sampled(Strict):
    """What completions and chat share: sampling, stops, streaming, the session."""

    model: str | None = None
    temperature: Annotated[float, Field(ge=0)] = 1.0
    top_p: Annotated[float, Field(gt=0, le=1)] = 1.0
    top_k: Annotated[int, Field(ge=1)] | None = None
    stop: str | list[str] | None = None
    seed: Annotated[int, Field(ge=0, lt=2**63)] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    user: str | None = None
    session: str | None = None

    @field_validator("session")
    @classmethod
    def _session_id(cls, session: str | None) -> str | None:
        return session if session is None else check_session_id(session)

    @field_validator("n")
    @classmethod
    def _one_choice(cls, n: int) -> int:
        if n != 1:
            raise ValueError(f"n={n} is not supported: one choice per prompt (send the request again for more)")
        return n

    @field_validator("stop")
    @classmethod
    def _stops(cls, stop):
        stops = [stop] if isinstance(stop, str) else stop or []
        if any(not s for s in stops):
            raise ValueError("a stop string must not be empty")
        return stops

    def stop_strings(self) -> tuple[str, ...]:
        return tuple(self.stop or ())


def _is_ids(value) -> bool:
    return isinstance(value, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in value)


class CompletionRequest(Sampled):
    prompt: str | list
    max_tokens: Annotated[int, Field(ge=0)] = 16
    echo: bool = False
    logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt(cls, prompt):
        if isinstance(prompt, str) or _is_ids(prompt):
            return prompt
        if isinstance(prompt, list) and prompt and all(isinstance(p, str) or _is_ids(p) for p in prompt):
            return prompt
        raise ValueError("must be a string, a list of token ids, or a non-empty list of strings or of id lists")

    def prompts(self) -> list[str | list[int]]:
        """One prompt per choice: a string or a list of token ids."""
        return [self.prompt] if isinstance(self.prompt, str) or _is_ids(self.prompt) else list(self.prompt)


class TextPart(Strict):
    type: Literal["text"]
    text: str


class Message(Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatRequest(Sampled):
    messages: Annotated[list[Message], Field(min_length=1)]
    max_tokens: Annotated[int, Field(ge=0)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=0)] | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None


class TokenizeRequest(Strict):
    """Text (`prompt`) or chat `messages` to ids. `add_special_tokens` is accepted for vLLM's clients (as
    lm-evaluation-harness's remote tokenizer sends it) and changes nothing: the codec adds no special tokens."""

    model: str | None = None
    prompt: str | None = None
    messages: list[Message] | None = None
    add_special_tokens: bool = False


class DetokenizeRequest(Strict):
    model: str | None = None
    tokens: list[Annotated[int, Field(strict=True)]]


class SessionRequest(Strict):
    id: str | None = None

    @field_validator("id")
    @classmethod
    def _session_id(cls, session: str | None) -> str | None:
        return session if session is None else check_session_id(session)


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


def error_body(message: str, param: str | None = None, code: str | None = None, kind="invalid_request_error") -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def usage(deltas: list[Delta]) -> dict:
    prompt = sum(d.prompt_tokens for d in deltas)
    completion = sum(d.completion_tokens for d in deltas)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _top(entry: Logprob, decode) -> dict[str, float] | None:
    if entry.top is None:
        return None
    return {decode([token]): logprob for token, logprob in sorted(entry.top.items(), key=lambda kv: -kv[1])}


def completion_logprobs(tokens: list[Logprob], decode) -> dict:
    """The legacy completions shape: parallel lists of token texts, logprobs, top alternatives, text offsets."""
    return {
        "tokens": [t.text for t in tokens],
        "token_logprobs": [t.logprob for t in tokens],
        "top_logprobs": [_top(t, decode) for t in tokens],
        "text_offset": [t.offset for t in tokens],
    }


def chat_logprobs(tokens: list[Logprob], decode) -> dict:
    """The chat shape: one entry per token with its text, bytes and top alternatives."""

    def entry(text: str, logprob: float) -> dict:
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    return {
        "content": [
            entry(t.text, t.logprob)
            | {"top_logprobs": [entry(text, lp) for text, lp in (_top(t, decode) or {}).items()]}
            for t in tokens
        ]
    }


def completion(reply_id: str, created: int, model: str, choices: list[dict], usage_: dict | None) -> dict:
    body = {"id": reply_id, "object": "text_completion", "created": created, "model": model, "choices": choices}
    return body if usage_ is None else body | {"usage": usage_}


def completion_choice(index: int, text: str, logprobs: dict | None, finish_reason: str | None) -> dict:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}


def chat(reply_id: str, created: int, model: str, choices: list[dict], usage_: dict | None, chunk: bool) -> dict:
    kind = "chat.completion.chunk" if chunk else "chat.completion"
    body = {"id": reply_id, "object": kind, "created": created, "model": model, "choices": choices}
    return body if usage_ is None else body | {"usage": usage_}


def chat_choice(index: int, text: str, logprobs: dict | None, finish_reason: str | None) -> dict:
    message = {"role": "assistant", "content": text}
    return {"index": index, "message": message, "logprobs": logprobs, "finish_reason": finish_reason}


def chat_delta(index: int, delta: dict, logprobs: dict | None, finish_reason: str | None) -> dict:
    return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
