"""Language modelling on text files: a byte-level BPE trained on the corpus, the corpus tokenized once into a cache,
documents packed into rows of whole windows (docs/method.md, "Text").

Examples are rows of `windows` windows of L (`window`, which follows `sleep.window`) tokens, laid out by
`sleeplm.data.packing.row_example` (`inputs`, `targets`, `loss_mask`, `valid`, `document_start`, `position`), plus
`window` (L, a scalar) for the metrics. Documents are held out whole, by the content hash of their text. The
default corpus is the Python standard library's own `.py` files (`{stdlib}` in `files`), so nothing is downloaded.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from sleeplm.config import check_positive_ints
from sleeplm.data.common import TaskSource, digest_is_held_out
from sleeplm.data.corpus import (
    DECODE_ERRORS,
    MANIFEST,
    Corpus,
    TokenCache,
    cached_tokenizer,
    cached_tokens,
    find_files,
)
from sleeplm.data.packing import PackedRows
from sleeplm.data.task import Codec, Task
from sleeplm.data.tokenizer import EOS, PAD, SMALLEST_VOCAB, decode, encode, load_tokenizer, special_id
from sleeplm.experiment.files import CORPUS, TOKENIZER


@dataclasses.dataclass(frozen=True)
class TextConfig:
    """`files`: a glob (`**` for any depth; `{stdlib}` is the Python standard library's directory) of plain text,
    `.jsonl` and `.parquet` files, less those `exclude` matches; `text_field`: the JSONL field or Parquet column
    holding the text; `decode_errors`: "replace" (bytes that are not UTF-8 become U+FFFD, with a warning) or
    "strict" (they fail naming file and offset). `vocab_size`: the tokenizer's (and the model's) vocabulary size;
    `tokenizer`: the path of a tokenizer.json to use, or "" to train one on the corpus's first
    `tokenizer_training_bytes` bytes (cached). A row holds `windows` windows of `window` tokens. `cache_dir`: where
    tokenizers and token caches are kept ("": $XDG_CACHE_HOME/sleeplm, else ~/.cache/sleeplm). `eos_token` ends
    every document and `pad_token` fills rows after the last one: the package's own tokenizers name them `<eos>`
    and `<pad>`; a pretrained model's tokenizer has its own (e.g. "<|endoftext|>"), and may have fewer tokens than
    the model's (padded) vocabulary."""

    files: str = "{stdlib}/**/*.py"
    exclude: str = "{stdlib}/site-packages/**"
    text_field: str = "text"
    decode_errors: str = "replace"
    vocab_size: int = 4096
    tokenizer: str = ""
    tokenizer_training_bytes: int = 1 << 30
    windows: int = 4
    window: int = 128
    cache_dir: str = ""
    eos_token: str = EOS
    pad_token: str = PAD

    def __post_init__(self) -> None:
        for name in ("files", "exclude", "text_field", "tokenizer", "cache_dir", "eos_token", "pad_token"):
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"task.{name}={getattr(self, name)!r} is invalid: must be a string")
        if not self.files:
            raise ValueError("task.files='' is invalid: give a glob of the corpus's files")
        if self.decode_errors not in DECODE_ERRORS:
            raise ValueError(f"task.decode_errors={self.decode_errors!r} is invalid: allowed are {DECODE_ERRORS}")
        check_positive_ints(self, ("windows", "window", "tokenizer_training_bytes"), prefix="task.")
        # A tokenizer trained here has the 256 bytes and the special tokens; a given one has its own size.
        smallest, why = (1, "") if self.tokenizer else (SMALLEST_VOCAB, " (the 256 bytes and the special tokens)")
        if not isinstance(self.vocab_size, int) or self.vocab_size < smallest:
            raise ValueError(f"task.vocab_size={self.vocab_size!r} is invalid: must be an integer >= {smallest}{why}")

    @property
    def sequence_length(self) -> int:
        return self.windows * self.window

    @property
    def special_tokens(self) -> tuple[str, str]:
        return (self.pad_token, self.eos_token)


def cache_directory(config: TextConfig) -> Path:
    if config.cache_dir:
        return Path(config.cache_dir)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "sleeplm"


def corpus_of(config: TextConfig) -> Corpus:
    """The corpus's files as they are now (fails naming the glob when it matches nothing)."""
    return Corpus(find_files(config.files, config.exclude), config.text_field, config.decode_errors)


def tokenizer_path(config: TextConfig, corpus: Corpus) -> Path:
    """`config.tokenizer` if given, else the tokenizer trained on `corpus` (trained once, cached)."""
    if config.tokenizer:
        return Path(config.tokenizer)
    return cached_tokenizer(corpus, config.vocab_size, config.tokenizer_training_bytes, cache_directory(config))


def token_cache(config: TextConfig) -> TokenCache:
    """The corpus tokenized (the tokenizer trained first when needed); built once per corpus state, cached."""
    corpus = corpus_of(config)
    path = tokenizer_path(config, corpus)
    load_tokenizer(path, expected_vocab_size=config.vocab_size, special_tokens=config.special_tokens)
    return cached_tokens(corpus, path, cache_directory(config), config.eos_token)


def text_tokenizer(config: TextConfig) -> Tokenizer:
    """The tokenizer of `config`'s token cache (what generation and scoring decode with)."""
    return load_tokenizer(token_cache(config).tokenizer_path, config.vocab_size, config.special_tokens)


class TextSource(TaskSource):
    """Rows of packed documents of one split; documents are held out by the content hash of their text.

    "train" repeats the corpus epoch after epoch (reshuffled and repacked each epoch) up to `size` rows; "eval" is
    one pass over the held-out documents and fails when it has fewer than `size` rows (never repeats a row).
    """

    config: TextConfig

    def __init__(self, config: TextConfig, *args, **kwargs) -> None:
        super().__init__(config, *args, **kwargs)
        self.cache = token_cache(config)
        held_out = np.array([digest_is_held_out(int(d), self.held_out_fraction) for d in self.cache.digests], bool)
        chosen = np.flatnonzero(held_out == (self.split == "eval"))
        where = f"files={config.files!r} at held_out_fraction={self.held_out_fraction}"
        if not len(chosen):
            raise ValueError(f"the {self.split} split of {where} has no document among the corpus's {len(held_out)}")
        tokenizer = load_tokenizer(self.cache.tokenizer_path, config.vocab_size, config.special_tokens)
        pad = special_id(tokenizer, config.pad_token)
        starts, lengths = self.cache.offsets[chosen], self.cache.lengths[chosen]
        self.rows = PackedRows(self.cache.tokens, starts, lengths, config.window, config.windows, pad, self.seed)
        if self.split == "eval" and self.rows.rows_in_epoch(0) < self.size:
            raise ValueError(
                f"the held-out split of {where} packs into {self.rows.rows_in_epoch(0)} rows, fewer than the "
                f"{self.size} asked for (run.eval_examples): ask for fewer, or hold out more"
            )

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.size:
            raise IndexError(f"index {index} is outside [0, {self.size})")
        return {**self.rows[index], "window": np.int32(self.config.window)}


def position_buckets(sequence_length: int, window: int) -> list[tuple[str, int, int]]:
    """(name, first, end) of the buckets of positions in a document: [0, L), [L, 2L), [2L, 4L), [4L, 8L), ...,
    named "pos0-L", "posL-2L", "pos2L-4L", ..., up to the row length."""
    name = lambda windows: "0" if windows == 0 else "L" if windows == 1 else f"{windows}L"
    buckets, low, high = [], 0, 1
    while low * window < sequence_length:
        buckets.append((f"pos{name(low)}-{name(high)}", low * window, high * window))
        low, high = high, 2 * high
    return buckets


def text_metrics(results: dict[str, np.ndarray], examples: dict[str, np.ndarray]) -> dict[str, float]:
    """Perplexity (exp of the held-out loss per token), and per bucket of positions within the document
    (`position_buckets`) the accuracy of the next token, `accuracy@pos...`, and its loss, `loss@pos...`, when the
    results carry per-position losses (`token_loss`, (examples, T)). Buckets without a token are left out."""
    metrics = {"perplexity": math.exp(float(results["loss_sum"].sum() / results["labels"].sum()))}
    labelled, position = examples["loss_mask"] > 0, examples["position"]
    windows = np.unique(examples["window"])
    if len(windows) != 1:
        raise ValueError(f"examples laid out in windows of {windows.tolist()} tokens cannot be bucketed together")
    for name, first, end in position_buckets(position.shape[-1], int(windows[0])):
        chosen = labelled & (position >= first) & (position < end)
        if chosen.any():
            metrics[f"accuracy@{name}"] = float(results["right"][chosen].mean())
            if "token_loss" in results:
                metrics[f"loss@{name}"] = float(results["token_loss"][chosen].mean())
    return metrics


def text_run_files(config: TextConfig) -> dict[str, Path]:
    """The tokenizer (`tokenizer.json`) and the token cache's manifest (`corpus.json`: which files, sizes and
    content digests, which tokenizer) a run's workdir keeps."""
    cache = token_cache(config)
    return {TOKENIZER: cache.tokenizer_path, CORPUS: cache.directory / MANIFEST}


def text_codec(config: TextConfig, workdir: Path) -> Codec:
    """The run's own tokenizer (its workdir's tokenizer.json), which must have the model's vocabulary size."""
    tokenizer = load_tokenizer(Path(workdir) / TOKENIZER, config.vocab_size, config.special_tokens)
    return Codec(lambda text: [int(i) for i in encode(tokenizer, text)], lambda ids: decode(tokenizer, ids))


def text_run_config(config: TextConfig, workdir: Path, current_corpus: bool) -> TextConfig:
    """`config` as a run's data is rebuilt after training (e.g. by `sleeplm eval`): with the run's own tokenizer
    (its workdir's tokenizer.json), never one given or trained anew; and on the corpus the run recorded (its
    corpus.json): when the corpus's files changed since, it fails naming them, unless `current_corpus` (the corpus
    as it is now, knowingly)."""
    tokenizer, corpus_record = Path(workdir) / TOKENIZER, Path(workdir) / CORPUS
    if not Path(tokenizer).is_file():
        raise ValueError(f"{tokenizer} does not exist: the run's data is built with its own tokenizer, kept there")
    config = dataclasses.replace(config, tokenizer=str(Path(tokenizer).absolute()))
    if current_corpus:
        return config
    if not Path(corpus_record).is_file():
        raise ValueError(
            f"{corpus_record} does not exist: it records the corpus the run was trained on; to use the corpus as "
            "it is now, say so (sleeplm eval --current-corpus)"
        )
    recorded = json.loads(Path(corpus_record).read_text())["corpus"]
    now = corpus_of(config).fingerprint
    if recorded != now:
        raise ValueError(
            f"the corpus changed since the run recorded it in {corpus_record}: {corpus_changes(recorded, now)}; "
            "restore it as it was, or evaluate on the corpus as it is now with --current-corpus"
        )
    return config


def corpus_changes(recorded: dict, now: dict) -> str:
    """What differs between two corpus fingerprints: files added, removed and changed (size or content), settings."""
    before = {path: tuple(state) for path, *state in recorded.get("files", [])}
    after = {path: tuple(state) for path, *state in now.get("files", [])}
    parts = []
    for label, paths in (
        ("added", sorted(set(after) - set(before))),
        ("removed", sorted(set(before) - set(after))),
        ("changed", sorted(p for p in set(before) & set(after) if before[p] != after[p])),
    ):
        if paths:
            shown = ", ".join(paths[:5]) + (f" and {len(paths) - 5} more" if len(paths) > 5 else "")
            parts.append(f"{label} {shown}")
    settings = [key for key in sorted(set(recorded) | set(now)) if key != "files" and recorded.get(key) != now.get(key)]
    parts += [f"{key}: recorded {recorded.get(key)!r}, now {now.get(key)!r}" for key in settings]
    return "; ".join(parts) or "the fingerprint differs"


TEXT = Task(
    "text",
    TextConfig,
    TextSource,
    metrics=text_metrics,
    run_files=text_run_files,
    codec=text_codec,
    run_config=text_run_config,
)
