"""lm-evaluation-harness on a sleeplm run: the model "sleeplm", whose requests are read window by window with sleep.

Each batch of requests is a stream of independent rows fed in blocks of `block_windows` windows by one jitted
`lax.scan` (`read_block`), which returns every fed token's log-likelihood and whether it was the argmax; windows
are slept on as they fill, so device memory does not depend on the context's length and nothing is truncated.
Requests are sorted by length so a batch's rows end together, and blocks of a short batch hold fewer windows.

Tokenization: the context's trailing whitespace moves to the continuation (as lm-eval does), then context +
continuation is encoded whole and split after the context's tokens when they are a prefix of the whole's (what
the model reads when it sees the text); otherwise (a BPE merge across the boundary, or the whitespace codec of the
synthetic tasks, where "a b" + "c" is not "a bc") the two are encoded separately. The first token of a row has no
prediction (as in `score` and in training): a rolling document's log-likelihood is that of its tokens after the
first, and an empty context takes the continuation's first token as context, unless `prefix_token` gives an id to
condition on (lm-eval's BOS / EOS convention, e.g. for a converted checkpoint trained with one).

    python -m sleeplm.evaluation.harness --model_args workdir=runs/lm,batch_size=8 --tasks my_task \\
        --include_path my_tasks/ --output_path out/ --log_samples

is `lm-eval run` with this module imported (`--model sleeplm` is added when no --model is given). From Python:

    import lm_eval
    from lm_eval.tasks import TaskManager

    import sleeplm.evaluation.harness  # registers "sleeplm"

    results = lm_eval.simple_evaluate(model="sleeplm", model_args="workdir=runs/lm,step=800", tasks=["my_task"],
                                      task_manager=TaskManager(include_path="my_tasks/"))

Model args: `workdir` (required), `step` (default: the latest checkpoint), `batch_size` (8; wins over
--batch_size), `block_windows` (16), `max_gen_toks` (256, when a request does not say), `prefix_token` (none).
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from lm_eval import utils
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from tqdm.auto import tqdm

from sleeplm.config import Config
from sleeplm.core.parameters import Params
from sleeplm.core.streaming import read, token_log_likelihoods
from sleeplm.data.task import Codec
from sleeplm.experiment.workdir import Workdir
from sleeplm.inference.generate import generate
from sleeplm.inference.streams import Stream, start_stream

GENERATION_CHUNK = 32  # tokens generated between checks for stop strings


@functools.partial(jax.jit, static_argnames=("config",), donate_argnames=("stream",))
def read_block(params: Params, stream: Stream, ids: jax.Array, valid: jax.Array, config: Config):
    """Feeds a block (B, K * L) of each row's next tokens (`valid`: a prefix of each row is real). Returns the
    stream (its logits: the prediction after each row's last token) and, per token, its log-likelihood and whether
    it is the argmax of the prediction before it (B, K * L) each; a row's first token is predicted by the stream's
    logits, which mean nothing before the row's first token."""
    batch, length = ids.shape
    window = config.sleep.window

    def one_window(stream: Stream, inputs):
        ids, real = inputs  # (B, L) each
        state, logits, predictions = read(params, stream.state, stream.logits, ids, real, config)
        greedy = jnp.argmax(predictions, axis=-1) == ids
        consumed = stream.consumed + jnp.sum(real, axis=1, dtype=jnp.int32)
        stream = stream._replace(state=state, logits=logits, consumed=consumed)
        return stream, (token_log_likelihoods(predictions, ids), greedy)

    windows = lambda x: jnp.moveaxis(x.reshape(batch, length // window, window), 1, 0)
    stream, (log_likelihood, greedy) = jax.lax.scan(one_window, stream, (windows(ids), windows(valid)))
    flat = lambda x: jnp.moveaxis(x, 0, 1).reshape(batch, length)
    return stream, flat(log_likelihood), flat(greedy)


@register_model("sleeplm")
class SleepLM(LM):
    """A sleeplm run's checkpoint as an lm-eval model (see the module docstring for its arguments)."""

    def __init__(
        self,
        workdir: str,
        step: int | None = None,
        batch_size: int | str = 8,
        block_windows: int = 16,
        max_gen_toks: int = 256,
        prefix_token: int | None = None,
        device: str | None = None,  # lm-eval passes these; JAX places the model itself
        max_batch_size: int | None = None,
    ) -> None:
        super().__init__()
        sizes = {"batch_size": batch_size, "block_windows": block_windows, "max_gen_toks": max_gen_toks}
        for name, value in sizes.items():
            if not str(value).isdigit() or int(value) < 1:
                raise ValueError(f"{name}={value!r} is invalid: must be a positive integer")
        run = Workdir(Path(workdir)).check()
        experiment = run.experiment()
        self.config: Config = experiment.config
        self.codec = run.codec(experiment)
        self.params, self.step = run.restore_params(experiment, step=step)
        self.workdir = run.path
        self.batch_size, self.block_windows, self.max_gen_toks = int(batch_size), int(block_windows), int(max_gen_toks)
        vocab = self.config.model.vocab_size
        if prefix_token is not None and not (isinstance(prefix_token, int) and 0 <= prefix_token < vocab):
            raise ValueError(f"prefix_token={prefix_token!r} is invalid: must be a token id in [0, {vocab})")
        self.prefix = [] if prefix_token is None else [prefix_token]

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None) -> SleepLM:
        """The model args win over lm-eval's own settings (its --batch_size is always given, 1 by default)."""
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None}
        return cls(**(extra | arg_dict))

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> SleepLM:
        return cls.create_from_arg_obj(utils.simple_parse_args_string(arg_string), additional_config)

    def get_model_info(self) -> dict:
        """What lm-eval records in its results' config: the run and the checkpoint step evaluated."""
        return {"workdir": str(self.workdir), "step": self.step}

    # ------------------------------------------------------------------------------------------------ reading

    def _stream(self, rows: int, tokens: int) -> Stream:
        """A fresh stream of `rows` rows; the no-eviction mode's holds `tokens` (rounded up to a power of two)."""
        capacity = None if self.config.sleep.eviction_mode.bounded else 1 << max(tokens - 1, 1).bit_length()
        return start_stream(self.config, rows, jax.random.key(0), capacity)

    def _read(self, rows: Sequence[list[int]], extra: int = 0):
        """Feeds `rows` (ragged id lists, padded to `batch_size` rows) through a fresh stream in blocks; returns the
        stream and each row's (log-likelihoods, greedy flags) of its tokens, numpy arrays. `extra`: tokens the
        stream must still take afterwards (the no-eviction mode's capacity)."""
        window, longest = self.config.sleep.window, max(len(row) for row in rows)
        windows = min(self.block_windows, 1 << max(-(-longest // window) - 1, 0).bit_length())  # power of two
        block = windows * window
        padded = list(rows) + [[]] * (self.batch_size - len(rows))
        lengths = np.array([len(row) for row in padded])
        ids = np.zeros((len(padded), -(-longest // block) * block), np.int32)
        for i, row in enumerate(padded):
            ids[i, : len(row)] = row
        stream = self._stream(len(padded), longest + extra)
        pieces = []
        for start in range(0, ids.shape[1], block):
            valid = np.arange(start, start + block)[None, :] < lengths[:, None]
            stream, log_likelihood, greedy = read_block(
                self.params, stream, jnp.asarray(ids[:, start : start + block]), jnp.asarray(valid), self.config
            )
            pieces.append(jax.device_get((log_likelihood, greedy)))
        log_likelihood, greedy = (np.concatenate([p[i] for p in pieces], axis=1) for i in (0, 1))
        return stream, [(log_likelihood[i, : len(r)], greedy[i, : len(r)]) for i, r in enumerate(rows)]

    def _batches(self, rows: Sequence[list[int]], description: str, disable: bool):
        """(indices, rows) batches of `batch_size`, longest rows first, under a progress bar over requests."""
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))
        with tqdm(total=len(rows), desc=description, unit="req", disable=disable) as bar:
            for first in range(0, len(order), self.batch_size):
                indices = order[first : first + self.batch_size]
                yield indices, [rows[i] for i in indices]
                bar.update(len(indices))

    def _check(self, rows: Sequence[list[int]], what: str) -> None:
        vocab = self.config.model.vocab_size
        for i, row in enumerate(rows):
            if not row:
                raise ValueError(f"{what} {i} has no tokens: give it a context, or set prefix_token")
            bad = [t for t in row if not 0 <= t < vocab]
            if bad:
                raise ValueError(f"{what} {i} has token id {bad[0]} outside the vocabulary [0, {vocab})")

    # ------------------------------------------------------------------------------------------------ lm-eval

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """(sum of the continuation's log-probabilities, whether greedy decoding gives it) per (context,
        continuation) request."""
        pairs = [encode_pair(self.codec, self.prefix, *request.args) for request in requests]
        rows = [context + continuation for context, continuation in pairs]
        self._check(rows, "request")
        results: list[tuple[float, bool]] = [(0.0, True)] * len(requests)
        for indices, batch in self._batches(rows, "loglikelihood", disable_tqdm):
            _, scored = self._read(batch)
            for i, (log_likelihood, greedy) in zip(indices, scored, strict=True):
                start = len(pairs[i][0])
                results[i] = (float(log_likelihood[start:].sum()), bool(greedy[start:].all()))
                self.cache_hook.add_partial("loglikelihood", requests[i].args, results[i])
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """The whole document's log-likelihood (every token after the first, or after `prefix_token`), unwindowed
        by lm-eval: the stream reads it all, sleeping on each window as it fills."""
        rows = [self.prefix + self.codec.encode(request.args[0]) for request in requests]
        self._check(rows, "document")
        results = [0.0] * len(requests)
        for indices, batch in self._batches(rows, "loglikelihood_rolling", disable_tqdm):
            _, scored = self._read(batch)
            for i, (log_likelihood, _) in zip(indices, scored, strict=True):
                results[i] = float(log_likelihood[1:].sum())
                self.cache_hook.add_partial("loglikelihood_rolling", requests[i].args, results[i])
        return results

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy continuations, cut before the first of the request's `until` strings, of at most `max_gen_toks`
        tokens. Batched rows share a request's settings; a batch stops once every row has a stop string."""
        settings = [self._generation_settings(request.args[1]) for request in requests]
        rows = [self.prefix + self.codec.encode(request.args[0]) for request in requests]
        self._check(rows, "context")
        results = [""] * len(requests)
        for indices, _ in self._batches(rows, "generate_until", disable_tqdm):
            for until, limit in dict.fromkeys(settings[i] for i in indices):
                group = [i for i in indices if settings[i] == (until, limit)]
                texts = self._generate([rows[i] for i in group], until, limit)
                for i, text in zip(group, texts, strict=True):
                    results[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return results

    def _generation_settings(self, kwargs: dict) -> tuple[tuple[str, ...], int]:
        kwargs = dict(kwargs or {})
        if kwargs.get("do_sample") or kwargs.get("temperature", 0.0) > 0:
            raise ValueError(f"generation kwargs {kwargs} ask for sampling: the sleeplm model generates greedily")
        until = kwargs.get("until", [])
        until = (until,) if isinstance(until, str) else tuple(until)
        return until, int(kwargs.get("max_gen_toks", self.max_gen_toks))

    def _generate(self, rows: Sequence[list[int]], until: tuple[str, ...], limit: int) -> list[str]:
        """Greedy continuations of `rows` in chunks of tokens, each row's cut at its first stop string."""
        stream, _ = self._read(rows, extra=1 + limit)
        prompts = [[]] * len(rows) + [[0]] * (self.batch_size - len(rows))  # padding rows: one token to start
        tokens: list[list[int]] = [[] for _ in rows]
        texts, generated = [""] * len(rows), 0
        while generated < limit and not all(any(stop in text for stop in until) for text in texts):
            chunk = min(GENERATION_CHUNK, limit - generated)
            generation = generate(self.params, stream, prompts, self.config, max_new_tokens=chunk)
            stream, prompts, generated = generation.stream, [[]] * len(prompts), generated + chunk
            for i in range(len(rows)):
                tokens[i] += [int(t) for t in generation.tokens[i]]
                texts[i] = self.codec.decode(tokens[i])
        return [cut(text, until) for text in texts]


def encode_pair(codec: Codec, prefix: list[int], context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of a request's context and continuation (see the module docstring); `prefix`: [] or the id an
    empty context stands for."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    if not context:
        ids = prefix + codec.encode(continuation)
        return ids[:1], ids[1:]
    context_ids = codec.encode(context)
    try:
        whole = codec.encode(context + continuation)
    except ValueError:  # the whitespace codec: the joined text has words its vocabulary lacks
        whole = []
    if whole[: len(context_ids)] == context_ids:
        return context_ids, whole[len(context_ids) :]
    return context_ids, codec.encode(continuation)


def cut(text: str, until: Sequence[str]) -> str:
    """`text` before the first occurrence of any of the `until` strings."""
    return text[: min([text.index(stop) for stop in until if stop in text], default=len(text))]


def main(argv: list[str] | None = None) -> None:
    """lm-eval's CLI with the "sleeplm" model registered; a run (`run` or no subcommand) gets `--model sleeplm`
    unless it names a --model."""
    from lm_eval.__main__ import cli_evaluate

    argv = sys.argv[1:] if argv is None else argv
    if "--model" not in argv and argv[:1] not in (["ls"], ["validate"]):
        argv = [*argv, "--model", "sleeplm"]
    sys.argv = ["lm-eval", *argv]
    cli_evaluate()


if __name__ == "__main__":
    main()
