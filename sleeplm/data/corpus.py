"""Files -> documents -> a token cache on disk: what the text task reads, tokenized once, read with random access.

**Files.** A glob (`**` recursive; `{stdlib}` stands for the Python standard library's directory) less an optional
exclude glob, sorted. By extension: `.jsonl` (one document per line, its `text_field` a string), `.parquet` (one
document per row of the `text_field` column), anything else plain text (the whole file is one document). Text is
UTF-8. What happens to bad input:

- a glob that matches no file, or only empty ones: fails, naming the glob;
- an empty file (0 bytes, or a Parquet file of no rows), and an empty text in JSONL or Parquet: skipped, and one
  warning names the skipped files;
- bytes that are not UTF-8: with `decode_errors="replace"` (the default) each becomes U+FFFD and one warning names
  the file and the first offset; with "strict" the build fails naming the file and the byte offset;
- a JSONL line that is not JSON, not an object, lacks the field or holds no string there: fails naming file and
  line; a Parquet file without the column, or with a null or non-text value: fails naming file (and row);
- a file deleted or changed while it is read: fails naming it. A file added, changed or deleted between runs
  changes the cache key (the file list with each file's size and SHA-256 of its bytes), so the next run rebuilds.

**Reading in bounded pieces.** A JSONL file is read line by line and a Parquet file row group by row group, so
reading needs memory for one document (or row group) at a time, not for the file. A plain text file is one
document, which is whole in memory anyway: it is read once, into bytes that are decoded. Each file's SHA-256 is
taken as it is read (a Parquet file's after it is read), and a file whose content no longer has the digest the
corpus was resolved with fails as changed.

**Keyed by content.** Resolving the corpus (`find_files`) hashes every file's bytes, streamed in pieces of 1 MiB:
an edit that keeps a file's size and mtime (as `cp -p` or `rsync -t` can) changes the key. The cost is one read
of the corpus per resolution (the standard library's ~2,000 .py files, ~30 MB: about 0.1 s when the page cache
holds them); mtimes are not part of the key, so touching a file rebuilds nothing.

**Token cache.** One directory per key, `tokens-<key>/` under the cache directory, the key hashing the file list
(paths, sizes, content digests), the reading settings, the tokenizer file's bytes and the format version:

    tokens.bin      every document's tokens then <eos>, back to back (uint16, or uint32 past 65536 tokens)
    offsets.npy     (documents + 1,) int64: document d is tokens[offsets[d]:offsets[d + 1]]
    digests.npy     (documents,) uint64: `content_digest` of each document's UTF-8 text (decides its split)
    files.npy       (documents,) int32: the index in the manifest's file list of the file each document comes from
    tokenizer.json  a copy of the tokenizer that wrote the tokens
    manifest.json   the key's inputs, the counts, the dtype, what was skipped or replaced, and `checksums`: the
                    size and SHA-256 of every other file of the directory

The tokenizer trained on a corpus is cached the same way in `tokenizer-<key>/` (tokenizer.json, manifest.json).
Every cache directory is written under a temporary name and renamed into place when complete, so a directory that
exists is complete and a crashed build leaves only a temporary directory that is never read. Processes that want
the same cache at once take turns on a lock file beside it (`<name>.lock`, `sleeplm.experiment.lock.waiting_lock`):
one builds, the others wait (logging whom they wait for) and then use its build. Every use of a cache first checks
its files against the manifest's checksums (streamed; one read of the cache); a truncated, corrupted or missing
file is never read as tokens: a warning names it and the cache is deleted and rebuilt. Caches are otherwise never
deleted by the package.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import hashlib
import json
import logging
import os
import shutil
import sysconfig
from array import array
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from sleeplm.data.common import content_digest
from sleeplm.data.tokenizer import EOS, encode_batch, load_tokenizer, special_id, train_tokenizer
from sleeplm.experiment.files import TOKENIZER, building
from sleeplm.experiment.lock import waiting_lock

logger = logging.getLogger(__name__)

FORMAT_VERSION = 2  # 2: files keyed by content digest, checksummed cache files
STDLIB = "{stdlib}"
DECODE_ERRORS = ("replace", "strict")
MANIFEST = "manifest.json"
ENCODE_BATCH_CHARS = 1 << 22  # documents are encoded in parallel batches of about this many characters
READ_CHUNK = 1 << 20  # bytes read at a time when hashing a file


def expand(pattern: str) -> str:
    """`pattern` with `{stdlib}` replaced by the Python standard library's directory."""
    return pattern.replace(STDLIB, sysconfig.get_paths()["stdlib"])


@dataclasses.dataclass(frozen=True)
class CorpusFile:
    path: str  # absolute
    size: int
    mtime_ns: int
    sha256: str  # of the file's bytes (what the cache key holds, and what reading checks the file against)


def sha256_of(path: str | Path, chunk: int = READ_CHUNK) -> str:
    """The SHA-256 of a file's bytes, read `chunk` bytes at a time."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while block := file.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def find_files(pattern: str, exclude: str = "") -> tuple[CorpusFile, ...]:
    """The files (not directories) `pattern` matches and `exclude` does not, sorted, with their sizes, mtimes and
    content digests (each file is read once, in bounded pieces)."""
    matched = {os.path.abspath(p) for p in glob.glob(expand(pattern), recursive=True) if os.path.isfile(p)}
    if exclude:
        matched -= {os.path.abspath(p) for p in glob.glob(expand(exclude), recursive=True)}
    if not matched:
        raise ValueError(
            f"files={pattern!r} matches no file" + (f" outside exclude={exclude!r}" if exclude else "") + f" (as "
            f"{expand(pattern)!r}): give a glob of text, .jsonl or .parquet files, `**` for any depth of directories"
        )
    found = []
    for path in sorted(matched):
        stat = os.stat(path)
        found.append(CorpusFile(path, stat.st_size, stat.st_mtime_ns, sha256_of(path)))
    if not any(file.size for file in found):
        raise ValueError(f"files={pattern!r} matches only empty files: {_listing([f.path for f in found])}")
    return tuple(found)


class ReadReport:
    """What reading skipped or decoded with replacement, told in one warning per kind when reading ends."""

    def __init__(self) -> None:
        self.empty: list[str] = []
        self.replaced: list[tuple[str, int, int]] = []  # (file, replaced characters, first bad byte offset)

    def as_json(self) -> dict:
        return {"empty": self.empty, "replaced": [list(r) for r in self.replaced]}

    def warn(self) -> None:
        if self.empty:
            logger.warning(f"skipped {len(self.empty)} empty files or texts: {_listing(self.empty)}")
        if self.replaced:
            listing = _listing([f"{path} ({count} from byte {offset})" for path, count, offset in self.replaced])
            logger.warning(f"replaced bytes that are not UTF-8 by U+FFFD in {len(self.replaced)} files: {listing}")


def _listing(items: list[str], shown: int = 10) -> str:
    more = f" and {len(items) - shown} more" if len(items) > shown else ""
    return ", ".join(items[:shown]) + more


@dataclasses.dataclass(frozen=True)
class Corpus:
    """A resolved list of files and how to read them; `documents()` yields (file index, text)."""

    files: tuple[CorpusFile, ...]
    text_field: str = "text"
    decode_errors: str = "replace"

    def __post_init__(self) -> None:
        if self.decode_errors not in DECODE_ERRORS:
            raise ValueError(f"decode_errors={self.decode_errors!r} is invalid: allowed are {DECODE_ERRORS}")

    @property
    def fingerprint(self) -> dict:
        """Everything the documents depend on (a cache key's input)."""
        return {
            "format": FORMAT_VERSION,
            "files": [[f.path, f.size, f.sha256] for f in self.files],
            "text_field": self.text_field,
            "decode_errors": self.decode_errors,
        }

    def documents(self, report: ReadReport | None = None) -> Iterator[tuple[int, str]]:
        """(file index, text) of every non-empty document, in file order, each file read in bounded pieces; what is
        skipped or replaced goes to `report`."""
        report = ReadReport() if report is None else report
        for index, file in enumerate(self.files):
            texts = 0
            for where, text in self._texts(file, report):
                texts += 1
                if text:
                    yield index, text
                else:
                    report.empty.append(file.path + where)
            if not texts:
                report.empty.append(file.path)

    @staticmethod
    def _open(file: CorpusFile):
        try:
            return open(file.path, "rb")
        except FileNotFoundError:
            raise ValueError(f"{file.path} was deleted while the corpus was read: run again") from None

    @staticmethod
    def _check_unchanged(file: CorpusFile, size: int, sha256: str) -> None:
        if (size, sha256) != (file.size, file.sha256):
            raise ValueError(f"{file.path} changed while the corpus was read: run again")

    def _texts(self, file: CorpusFile, report: ReadReport) -> Iterator[tuple[str, str]]:
        """(where in the file, text) of each document of the file, read in bounded pieces and checked against the
        digest the corpus was resolved with."""
        path = file.path
        with self._open(file) as stream:
            if path.endswith(".parquet"):
                if file.size:
                    yield from self._parquet_texts(path, stream, report)
                self._check_unchanged(file, os.fstat(stream.fileno()).st_size, sha256_of(path))
            elif path.endswith(".jsonl"):
                yield from self._jsonl_texts(file, stream, report)
            else:
                data = stream.read()
                self._check_unchanged(file, len(data), hashlib.sha256(data).hexdigest())
                if data:
                    text, replaced, first = self._decode(path, data)
                    if replaced:
                        report.replaced.append((path, replaced, first))
                    yield "", text

    def _decode(self, path: str, data: bytes, offset: int = 0, where: str = "") -> tuple[str, int, int]:
        """(text, replaced characters, offset in the file of the first bad byte) of `data`, which starts at byte
        `offset` of the file."""
        try:
            return data.decode("utf-8"), 0, -1
        except UnicodeDecodeError as error:
            if self.decode_errors == "strict":
                raise ValueError(
                    f"{path}{where}: byte {offset + error.start} is not UTF-8 ({error.reason}); set "
                    "decode_errors='replace' to read it with U+FFFD in its place"
                ) from None
            text = data.decode("utf-8", errors="replace")
            return text, text.count("\ufffd") - data.count("\ufffd".encode()), offset + error.start

    def _jsonl_texts(self, file: CorpusFile, stream, report: ReadReport) -> Iterator[tuple[str, str]]:
        """Line by line: only one line of the file is in memory at a time."""
        path, field = file.path, self.text_field
        digest, offset, replaced, first = hashlib.sha256(), 0, 0, -1
        for number, raw in enumerate(stream, start=1):
            digest.update(raw)
            line, count, bad = self._decode(path, raw, offset)
            offset += len(raw)
            if count:
                replaced, first = replaced + count, first if replaced else bad
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except (json.JSONDecodeError, RecursionError) as error:  # RecursionError: nested too deeply to parse
                raise ValueError(f"{path}:{number}: is not JSON ({type(error).__name__}: {error})") from None
            if not isinstance(record, dict) or field not in record:
                fields = sorted(record) if isinstance(record, dict) else type(record).__name__
                raise ValueError(f"{path}:{number}: has no field {field!r} (text_field) in {fields}")
            if not isinstance(record[field], str):
                raise ValueError(f"{path}:{number}: field {field!r} holds {type(record[field]).__name__}, not a string")
            yield f":{number}", record[field]
        self._check_unchanged(file, offset, digest.hexdigest())
        if replaced:
            report.replaced.append((path, replaced, first))

    def _parquet_texts(self, path: str, stream, report: ReadReport) -> Iterator[tuple[str, str]]:
        """Row group by row group (`iter_batches`): one batch of rows of the text column in memory at a time."""
        field = self.text_field
        try:
            parquet = pq.ParquetFile(stream, pre_buffer=False)  # pre-buffering would read every row group at once
        except (pa.ArrowException, OSError) as error:
            raise ValueError(f"{path}: is not a Parquet file ({error})") from None
        schema = parquet.schema_arrow
        if field not in schema.names:
            raise ValueError(f"{path}: has no column {field!r} (text_field) in {schema.names}")
        kind = schema.field(field).type
        textual = pa.types.is_string(kind) or pa.types.is_large_string(kind)
        if not (textual or pa.types.is_binary(kind) or pa.types.is_large_binary(kind)):
            raise ValueError(f"{path}: column {field!r} holds {kind}, not text")
        row = 0
        for batch in parquet.iter_batches(batch_size=1024, columns=[field]):
            for value in batch.column(0).to_pylist():
                where = f" row {row}"
                if value is None:
                    raise ValueError(f"{path}{where}: column {field!r} is null")
                if not textual:
                    value, replaced, first = self._decode(path, value, where=where)
                    if replaced:
                        report.replaced.append((path + where, replaced, first))
                yield where, value
                row += 1


def _key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:20]


def _file_digest(path: Path) -> str:
    return sha256_of(path)


def checksums(directory: Path) -> dict[str, list]:
    """{name: [size, SHA-256]} of every file of a cache directory but its manifest (what the manifest records)."""
    files = sorted(p for p in Path(directory).iterdir() if p.is_file() and p.name != MANIFEST)
    return {p.name: [p.stat().st_size, sha256_of(p)] for p in files}


def damage(directory: Path) -> str | None:
    """What is wrong with a cache directory's files against its manifest's checksums (None when nothing is):
    a file missing, of another size (truncated) or of another content (corrupted). Files are hashed streamed."""
    try:
        recorded = json.loads((directory / MANIFEST).read_text())["checksums"]
    except (ValueError, KeyError, TypeError) as error:
        return f"its {MANIFEST} is unreadable or has no checksums ({type(error).__name__}: {error})"
    for name, (size, sha256) in sorted(recorded.items()):
        path = directory / name
        if not path.is_file():
            return f"{path} is missing"
        if path.stat().st_size != size:
            return f"{path} holds {path.stat().st_size} bytes, not the {size} it was written with (truncated?)"
        if sha256_of(path) != sha256:
            return f"{path} does not match its checksum (corrupted)"
    return None


@contextlib.contextmanager
def _one_builder(final: Path, what: str) -> Iterator[bool]:
    """Tells whether cache directory `final` is there and intact, holding its lock (waiting while another process
    builds it) unless it is: a damaged one is deleted (with a warning naming the damage) so it is rebuilt. An intact
    cache is checked without the lock, so processes that share one check it in parallel."""
    if _complete(final) and damage(final) is None:
        yield True
        return
    with waiting_lock(final.parent / f"{final.name}.lock", f"building {what} in {final}"):
        complete = _complete(final)
        if complete:
            problem = damage(final)
            if problem is not None:
                logger.warning(f"the cache {final} is damaged and is rebuilt: {problem}")
                aside = final.parent / f".{final.name}.damaged.{os.getpid()}"
                os.rename(final, aside)
                shutil.rmtree(aside, ignore_errors=True)
                complete = False
        yield complete


def write_atomically(final: Path, build: Callable[[Path], dict]) -> None:
    """Builds a cache directory: `build(temporary)` fills a temporary directory beside `final` and returns the
    manifest, written last; the directory is then renamed to `final`. If another process renamed its own build
    there first, that one is kept. Nothing half-written ever has the name `final`."""
    with building(final, keep_existing=True) as temporary:
        manifest = build(temporary)
        (temporary / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    if not (final / MANIFEST).is_file():
        raise ValueError(f"cache directory {final} has no {MANIFEST}: it is not one this package wrote; delete it")


def _complete(directory: Path) -> bool:
    if directory.exists() and not (directory / MANIFEST).is_file():
        raise ValueError(f"cache directory {directory} has no {MANIFEST}: it is not one this package wrote; delete it")
    return directory.exists()


def cached_tokenizer(corpus: Corpus, vocab_size: int, training_bytes: int, cache_dir: Path) -> Path:
    """The path of a tokenizer of `vocab_size` tokens trained on the corpus's first documents (file order) up to
    `training_bytes` bytes of text; trained once per key and cached."""
    inputs = {"corpus": corpus.fingerprint, "vocab_size": vocab_size, "training_bytes": training_bytes}
    final = Path(cache_dir) / f"tokenizer-{_key('tokenizer', inputs)}"
    with _one_builder(final, "a tokenizer") as complete:
        if not complete:

            def build(directory: Path) -> dict:
                logger.info(f"training a tokenizer of {vocab_size} tokens on {len(corpus.files)} files into {final}")
                train_tokenizer(_first_texts(corpus, training_bytes), vocab_size, directory / TOKENIZER)
                return {**inputs, "checksums": checksums(directory)}

            write_atomically(final, build)
    return final / TOKENIZER


def _first_texts(corpus: Corpus, budget: int) -> Iterator[str]:
    for _, text in corpus.documents():
        yield text
        budget -= len(text.encode("utf-8"))
        if budget <= 0:
            return


@dataclasses.dataclass(frozen=True)
class TokenCache:
    """A token cache directory, memory-mapped: `document(d)` is document d's tokens (its text's, then <eos>)."""

    directory: Path
    tokens: np.ndarray
    offsets: np.ndarray
    digests: np.ndarray
    files: np.ndarray
    manifest: dict

    @classmethod
    def load(cls, directory: Path) -> TokenCache:
        manifest = json.loads((directory / MANIFEST).read_text())
        path, dtype, count = directory / "tokens.bin", np.dtype(manifest["dtype"]), manifest["tokens"]
        if path.stat().st_size != count * dtype.itemsize:
            raise ValueError(
                f"{path} holds {path.stat().st_size} bytes, not the {count} {dtype} tokens of its manifest: the "
                f"cache is damaged; delete {directory}"
            )
        tokens = np.memmap(path, dtype=dtype, mode="r", shape=(count,))
        load = lambda name: np.load(directory / name, mmap_mode="r")
        return cls(directory, tokens, load("offsets.npy"), load("digests.npy"), load("files.npy"), manifest)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def tokenizer_path(self) -> Path:
        return self.directory / TOKENIZER

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def document(self, index: int) -> np.ndarray:
        return np.asarray(self.tokens[self.offsets[index] : self.offsets[index + 1]])


def cached_tokens(corpus: Corpus, tokenizer_path: Path, cache_dir: Path, eos_token: str = EOS) -> TokenCache:
    """The corpus tokenized by the tokenizer at `tokenizer_path`, each document ended by `eos_token`, built once
    per key and memory-mapped."""
    inputs = {"corpus": corpus.fingerprint, "tokenizer_sha256": _file_digest(tokenizer_path)}
    if eos_token != EOS:  # caches of the package's own tokenizers keep their keys
        inputs["eos_token"] = eos_token
    final = Path(cache_dir) / f"tokens-{_key('tokens', inputs)}"
    with _one_builder(final, "a token cache") as complete:
        if not complete:
            logger.info(f"tokenizing {len(corpus.files)} files into {final}")

            def build(directory: Path) -> dict:
                counts = write_tokens(corpus, tokenizer_path, directory, eos_token)
                return {**inputs, **counts, "checksums": checksums(directory)}

            write_atomically(final, build)
        return TokenCache.load(final)


def write_tokens(corpus: Corpus, tokenizer_path: Path, directory: Path, eos_token: str = EOS) -> dict:
    """Tokenizes every document into the files of a token cache in `directory`; returns the manifest's counts."""
    tokenizer = load_tokenizer(tokenizer_path, special_tokens=(eos_token,))
    dtype = np.uint16 if tokenizer.get_vocab_size() <= 1 << 16 else np.uint32
    eos = np.asarray([special_id(tokenizer, eos_token)], dtype)
    offsets, digests, files = array("q", [0]), array("Q"), array("i")  # compact while the corpus streams by
    report = ReadReport()
    with (directory / "tokens.bin").open("wb") as out:

        def flush(batch: list[tuple[int, str]]) -> None:
            for (file, text), ids in zip(batch, encode_batch(tokenizer, [t for _, t in batch]), strict=True):
                out.write(ids.astype(dtype).tobytes() + eos.tobytes())
                offsets.append(offsets[-1] + len(ids) + 1)
                digests.append(content_digest(text.encode("utf-8")))
                files.append(file)

        batch, chars = [], 0
        for document in corpus.documents(report):
            batch.append(document)
            chars += len(document[1])
            if chars >= ENCODE_BATCH_CHARS:
                flush(batch)
                batch, chars = [], 0
        flush(batch)
    report.warn()
    if len(offsets) == 1:
        raise ValueError(f"the corpus of {len(corpus.files)} files has no document: every file or text is empty")
    np.save(directory / "offsets.npy", np.frombuffer(offsets, np.int64))
    np.save(directory / "digests.npy", np.frombuffer(digests, np.uint64))
    np.save(directory / "files.npy", np.frombuffer(files, np.int32))
    shutil.copyfile(tokenizer_path, directory / TOKENIZER)
    return {"dtype": np.dtype(dtype).name, "tokens": offsets[-1], "documents": len(digests), **report.as_json()}
