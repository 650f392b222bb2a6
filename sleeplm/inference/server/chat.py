"""Chat messages to token ids: the tokenizer's chat template when the run has one, else a plain documented one.

A workdir's `tokenizer_config.json` (copy it there from the transformers checkpoint; `sleeplm convert` keeps only
`tokenizer.json`) may hold a jinja `chat_template`, rendered as transformers renders it (a sandboxed environment
with trim_blocks and lstrip_blocks, `messages`, `add_generation_prompt`, `bos_token`, `eos_token`). The special
tokens the rendered text names (`<|im_start|>`, ...: tokenizer.json's added tokens marked special) become their ids;
the text between them goes through the run's codec, which encodes special-token names as plain text. Such a reply
stops at the config's `eos_token`.

Without one, PLAIN_TEMPLATE: each message as a line `<|ROLE|>` followed by its content on the next line, then
`<|assistant|>` and a newline; a reply stops where the model starts another such line (the stop string "\\n<|").
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable, Sequence
from pathlib import Path

from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from sleeplm.experiment.files import TOKENIZER

PLAIN_TEMPLATE = (
    "{% for message in messages %}<|{{ message.role }}|>\n{{ message.content }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
PLAIN_STOP = "\n<|"


def special_tokens(workdir: Path) -> dict[str, int]:
    """{text: id} of the special tokens in the workdir's tokenizer.json (none without one)."""
    path = Path(workdir) / TOKENIZER
    if not path.is_file():
        return {}
    added = json.loads(path.read_text()).get("added_tokens", [])
    return {token["content"]: int(token["id"]) for token in added if token.get("special")}


def end_of_text(workdir: Path, task) -> tuple[int, ...]:
    """The stop tokens every reply of a run ends at: a text run's end-of-document token (`TextConfig.eos_token`),
    when its tokenizer has it as a special token; none otherwise."""
    eos = special_tokens(workdir).get(getattr(task, "eos_token", None))
    return () if eos is None else (eos,)


def _token_text(value) -> str:
    """A tokenizer_config.json token: a string or {"content": string, ...}."""
    return value.get("content", "") if isinstance(value, dict) else value or ""


def _raise(message: str):
    raise TemplateError(message)


@dataclasses.dataclass(frozen=True)
class ChatTemplate:
    """`source` (jinja), the `specials` {text: id} split out of the rendered text, the `stop_strings` and
    `stop_tokens` that end a reply, and the `bos_token` / `eos_token` texts the template may use."""

    source: str
    specials: dict[str, int] = dataclasses.field(default_factory=dict)
    stop_strings: tuple[str, ...] = (PLAIN_STOP,)
    stop_tokens: tuple[int, ...] = ()
    bos_token: str = ""
    eos_token: str = ""

    @classmethod
    def for_workdir(cls, workdir: Path) -> ChatTemplate:
        """The workdir's tokenizer_config.json chat template if it has one, else the plain template."""
        specials = special_tokens(workdir)
        path = Path(workdir) / "tokenizer_config.json"
        config = json.loads(path.read_text()) if path.is_file() else {}
        source = config.get("chat_template")
        if isinstance(source, list):  # several named templates: the default one
            source = next((t["template"] for t in source if t.get("name") == "default"), None)
        if not source:
            return cls(PLAIN_TEMPLATE, specials)
        bos, eos = _token_text(config.get("bos_token")), _token_text(config.get("eos_token"))
        stop_tokens = (specials[eos],) if eos in specials else ()
        return cls(source, specials, (eos,) if eos else (), stop_tokens, bos, eos)

    def render(self, messages: Sequence[dict], add_generation_prompt: bool = True) -> str:
        environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        environment.globals["raise_exception"] = _raise
        template = environment.from_string(self.source)
        return template.render(
            messages=list(messages),
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token,
            eos_token=self.eos_token,
        )

    def ids(self, text: str, encode: Callable[[str], list[int]]) -> list[int]:
        """The token ids of a rendered `text`: its special tokens' ids, the text between them through `encode`."""
        if not self.specials:
            return list(encode(text))
        pattern = "|".join(re.escape(s) for s in sorted(self.specials, key=len, reverse=True))
        ids: list[int] = []
        for i, piece in enumerate(re.split(f"({pattern})", text)):
            if i % 2:
                ids.append(self.specials[piece])
            elif piece:
                ids.extend(encode(piece))
        return ids
