"""A byte-level BPE tokenizer (Hugging Face `tokenizers`): trained on a corpus, saved as one `tokenizer.json`.

Byte-level: every string is first written as its UTF-8 bytes, each byte a symbol of the base alphabet, so any
Unicode text encodes, and decoding gives the same text back. Two special tokens, `<pad>` (rows' padding) and
`<eos>` (ends every document), are never produced from text: a text that contains the string "<eos>" encodes it
byte by byte like any other text.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from sleeplm.experiment.files import atomic_write

PAD, EOS = "<pad>", "<eos>"
SPECIAL_TOKENS = (PAD, EOS)
BYTE_ALPHABET = 256
SMALLEST_VOCAB = BYTE_ALPHABET + len(SPECIAL_TOKENS)


def train_tokenizer(texts: Iterable[str], vocab_size: int, path: str | Path) -> Tokenizer:
    """Trains a byte-level BPE of exactly `vocab_size` tokens (special tokens first: `<pad>` 0, `<eos>` 1, then the
    256 bytes, then merges) on `texts` and saves it to `path` (written whole or not at all). Fails when the texts
    are too few to learn that many merges."""
    if not isinstance(vocab_size, int) or vocab_size < SMALLEST_VOCAB:
        raise ValueError(
            f"vocab_size={vocab_size!r} is invalid: must be an integer >= {SMALLEST_VOCAB} (the 256 bytes and the "
            f"special tokens {list(SPECIAL_TOKENS)})"
        )
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    if tokenizer.get_vocab_size() != vocab_size:
        raise ValueError(
            f"vocab_size={vocab_size} is too large for this corpus: byte-level BPE found only "
            f"{tokenizer.get_vocab_size()} tokens in it; lower the vocabulary size to at most that, or add text"
        )
    atomic_write(Path(path), tokenizer.to_str(pretty=True))
    return _text_only(tokenizer)


def load_tokenizer(
    path: str | Path, expected_vocab_size: int | None = None, special_tokens: Sequence[str] = SPECIAL_TOKENS
) -> Tokenizer:
    """The tokenizer saved at `path`; fails naming the file when it is missing, unreadable, lacks the
    `special_tokens` (this package's `<pad>` and `<eos>` by default; a pretrained model's tokenizer names its own),
    or has a vocabulary size other than `expected_vocab_size`."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"tokenizer file {path} does not exist")
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as error:
        raise ValueError(f"tokenizer file {path} is not a tokenizers JSON file ({error})") from error
    missing = [token for token in special_tokens if tokenizer.token_to_id(token) is None]
    if missing:
        raise ValueError(f"tokenizer file {path} lacks the special tokens {missing}")
    size = tokenizer.get_vocab_size()
    if expected_vocab_size is not None and size != expected_vocab_size:
        raise ValueError(
            f"tokenizer file {path} has {size} tokens, but the config expects vocab_size={expected_vocab_size}: "
            f"set the vocabulary size to {size} or use a tokenizer of {expected_vocab_size} tokens"
        )
    return _text_only(tokenizer)


def _text_only(tokenizer: Tokenizer) -> Tokenizer:
    """Special tokens written in a text are encoded as text (this setting is not saved in tokenizer.json)."""
    tokenizer.encode_special_tokens = True
    return tokenizer


def special_id(tokenizer: Tokenizer, token: str) -> int:
    return int(tokenizer.token_to_id(token))


def _check_text(text: str) -> None:
    if not isinstance(text, str):
        raise ValueError(f"cannot encode {type(text).__name__} {text!r:.40}: expected a str")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise ValueError(
            f"cannot encode text with a lone surrogate {text[error.start]!r} at character {error.start}: "
            "text must be valid Unicode (decode bytes with errors='replace')"
        ) from None


def encode(tokenizer: Tokenizer, text: str) -> np.ndarray:
    """Token ids (int32) of `text`, no special tokens added."""
    return encode_batch(tokenizer, [text])[0]


def encode_batch(tokenizer: Tokenizer, texts: Sequence[str]) -> list[np.ndarray]:
    """Token ids (int32) of each text, encoded in parallel."""
    for text in texts:
        _check_text(text)
    encodings = tokenizer.encode_batch(list(texts), add_special_tokens=False)
    return [np.asarray(encoding.ids, np.int32) for encoding in encodings]


def decode(tokenizer: Tokenizer, ids: Sequence[int]) -> str:
    """The text of `ids`; special tokens appear as their names ("<eos>")."""
    return tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)
