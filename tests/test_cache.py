"""The token cache under concurrency, damage and edits that fool size and mtime, and the corpus read in bounded
pieces: two real processes building one cache at once make one complete cache (one builds, the other waits and
reuses it); a truncated or corrupted cache file is caught by its checksum and rebuilt, never read as tokens; the
key follows the files' content, so an edit that keeps size and mtime rebuilds; JSONL and Parquet files are read a
line or a row group at a time."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import subprocess
import sys
import threading
import time
import tracemalloc

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from sleeplm.data import corpus as corpus_module
from sleeplm.data.corpus import Corpus, cached_tokenizer, cached_tokens, find_files
from sleeplm.data.tokenizer import encode, load_tokenizer

VOCAB = 300
WORDS = ["the", "of", "sleep", "window", "token", "memory", "fast", "weight", "attention", "delta", "rule", "pass"]


def write_corpus(directory, documents: int = 40, seed: int = 0) -> list[str]:
    """`documents` JSONL documents in two files; returns their texts."""
    rng = np.random.default_rng(seed)
    texts = [" ".join(rng.choice(WORDS, int(rng.integers(1, 120)))) + ".\n" for _ in range(documents)]
    for name, chunk in (("a.jsonl", texts[: documents // 2]), ("b.jsonl", texts[documents // 2 :])):
        directory.mkdir(parents=True, exist_ok=True)
        (directory / name).write_text("".join(json.dumps({"text": text}) + "\n" for text in chunk))
    return texts


def build(tmp_path):
    corpus = Corpus(find_files(str(tmp_path / "corpus" / "*.jsonl")))
    tokenizer = cached_tokenizer(corpus, VOCAB, 1 << 20, tmp_path / "cache")
    return cached_tokens(corpus, tokenizer, tmp_path / "cache")


def documents(cache) -> list[list[int]]:
    return [cache.document(d).tolist() for d in range(len(cache))]


def expected(cache, texts) -> list[list[int]]:
    tokenizer = load_tokenizer(cache.tokenizer_path)
    return [[*encode(tokenizer, text).tolist(), tokenizer.token_to_id("<eos>")] for text in texts]


def count_builds(monkeypatch) -> list[int]:
    builds: list[int] = []
    write = corpus_module.write_tokens
    monkeypatch.setattr(corpus_module, "write_tokens", lambda *a: builds.append(1) or write(*a))
    return builds


# A process that builds the cache of tmp_path's corpus once the other one is ready too, its build slowed down so
# that the two overlap; it prints what its cache holds.
BUILDER = """
import hashlib, logging, pathlib, sys, time
logging.basicConfig(level=logging.INFO, format="%(name)s %(message)s")
from sleeplm.data import corpus as corpus_module
from sleeplm.data.corpus import Corpus, cached_tokenizer, cached_tokens, find_files
root, me, other = pathlib.Path(sys.argv[1]), sys.argv[2], sys.argv[3]
write = corpus_module.write_tokens
def slow(*args):
    time.sleep(1.0)
    return write(*args)
corpus_module.write_tokens = slow
(root / me).touch()
while not (root / other).exists():
    time.sleep(0.01)
corpus = Corpus(find_files(str(root / "corpus" / "*.jsonl")))
cache = cached_tokens(corpus, cached_tokenizer(corpus, 300, 1 << 20, root / "cache"), root / "cache")
print(cache.directory, hashlib.sha256(cache.tokens.tobytes()).hexdigest(), len(cache))
"""


def test_two_processes_building_the_same_cache_at_once_make_one_complete_cache(tmp_path):
    texts = write_corpus(tmp_path / "corpus")
    command = lambda me, other: [sys.executable, "-c", BUILDER, str(tmp_path), me, other]
    processes = [
        subprocess.Popen(command(me, other), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for me, other in (("ready-1", "ready-2"), ("ready-2", "ready-1"))
    ]
    outputs = [process.communicate(timeout=120) for process in processes]
    assert [process.returncode for process in processes] == [0, 0], outputs
    printed = {out.strip() for out, _ in outputs}
    assert len(printed) == 1  # the same cache directory, the same tokens
    logs = "".join(err for _, err in outputs)
    assert logs.count("tokenizing 2 files into") == 1, logs  # one build
    assert logs.count("training a tokenizer of") == 1, logs
    assert "waiting for pid" in logs and "building a token cache in" in logs, logs
    names = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert [n.split("-")[0] for n in names] == ["tokenizer", "tokens"]  # no lock, no temporary directory left
    cache = build(tmp_path)
    assert documents(cache) == expected(cache, texts) and str(cache.directory) == printed.pop().split()[0]


def test_one_builds_while_another_waits_for_it_then_reuses_its_build(tmp_path, monkeypatch, caplog):
    """The same as the two processes above, in two threads (a flock is per open file, so they exclude each other)."""
    texts = write_corpus(tmp_path / "corpus")
    corpus = Corpus(find_files(str(tmp_path / "corpus" / "*.jsonl")))
    tokenizer = cached_tokenizer(corpus, VOCAB, 1 << 20, tmp_path / "cache")
    building, builds, write = threading.Event(), [], corpus_module.write_tokens

    def slow(*args):
        builds.append(1)
        building.set()
        time.sleep(0.5)
        return write(*args)

    monkeypatch.setattr(corpus_module, "write_tokens", slow)
    first: list = []
    thread = threading.Thread(target=lambda: first.append(cached_tokens(corpus, tokenizer, tmp_path / "cache")))
    thread.start()
    assert building.wait(30)
    with caplog.at_level(logging.INFO, logger="sleeplm"):
        second = cached_tokens(corpus, tokenizer, tmp_path / "cache")
    thread.join()
    assert builds == [1] and first[0].directory == second.directory
    assert documents(second) == documents(first[0]) == expected(second, texts)
    waited = [r.getMessage() for r in caplog.records if r.getMessage().startswith("waiting for")]
    assert len(waited) == 1 and f"waiting for pid {os.getpid()} on host" in waited[0]
    assert f"building a token cache in {second.directory}" in waited[0]


def test_a_truncated_or_corrupted_cache_file_is_rebuilt_never_read(tmp_path, monkeypatch, caplog):
    texts = write_corpus(tmp_path / "corpus")
    builds = count_builds(monkeypatch)
    cache = build(tmp_path)
    tokens = cache.directory / "tokens.bin"
    size = tokens.stat().st_size
    with tokens.open("r+b") as file:
        file.truncate(size - 2)  # one token short: still a whole number of tokens
    with caplog.at_level(logging.WARNING, logger="sleeplm.data.corpus"):
        rebuilt = build(tmp_path)
    assert builds == [1, 1] and documents(rebuilt) == expected(rebuilt, texts)
    assert f"{tokens} holds {size - 2} bytes, not the {size} it was written with" in logged(caplog)

    with tokens.open("r+b") as file:  # the same size, one byte flipped
        file.seek(size // 2)
        byte = file.read(1)
        file.seek(size // 2)
        file.write(bytes([byte[0] ^ 0x01]))
    again = build(tmp_path)
    assert builds == [1, 1, 1] and documents(again) == expected(again, texts)
    assert f"the cache {cache.directory} is damaged and is rebuilt: {tokens} does not match its checksum" in (
        logged(caplog)
    )

    tokenizer = again.tokenizer_path  # the copy in the token cache; the tokenizer cache is checked the same way
    trained = next((tmp_path / "cache").glob("tokenizer-*")) / "tokenizer.json"
    trained.write_text(trained.read_text().replace('"<eos>"', '"<eoz>"'))
    final = build(tmp_path)
    assert f"{trained} does not match its checksum" in logged(caplog)
    assert builds == [1, 1, 1] and documents(final) == documents(again) and tokenizer.is_file()
    assert sorted(p.name.split("-")[0] for p in (tmp_path / "cache").iterdir()) == ["tokenizer", "tokens"]


def test_the_cache_is_keyed_by_content_so_an_edit_that_keeps_size_and_mtime_rebuilds(tmp_path, monkeypatch):
    texts = write_corpus(tmp_path / "corpus")
    builds = count_builds(monkeypatch)
    first = build(tmp_path)
    path = tmp_path / "corpus" / "a.jsonl"
    stat = path.stat()
    edited = path.read_text().replace("sleep", "SLEEP", 1)  # as `cp -p` or `rsync -t` of an edited copy leaves it
    path.write_text(edited)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert (path.stat().st_size, path.stat().st_mtime_ns) == (stat.st_size, stat.st_mtime_ns)
    second = build(tmp_path)
    assert builds == [1, 1] and second.directory != first.directory
    texts = [json.loads(line)["text"] for line in edited.splitlines()] + texts[20:]
    assert documents(second) == expected(second, texts)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # touched only: the same content, reused
    assert build(tmp_path).directory == second.directory and builds == [1, 1]


def test_jsonl_and_parquet_files_are_read_in_bounded_pieces(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    texts = [" ".join(rng.choice(WORDS, 200)) for _ in range(16)]
    lines = [json.dumps({"text": f"{i} {texts[i % 16]}"}) + "\n" for i in range(16_000)]
    (tmp_path / "big.jsonl").write_text("".join(lines))  # about 20 MB
    size = (tmp_path / "big.jsonl").stat().st_size
    corpus = Corpus(find_files(str(tmp_path / "big.jsonl")))
    tracemalloc.start()
    try:
        count = sum(1 for _ in corpus.documents())
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert count == 16_000 and size > 15e6 and peak < 2e6, (size, peak)

    table = pa.table({"text": [json.loads(line)["text"] for line in lines]})
    pq.write_table(table, tmp_path / "big.parquet", row_group_size=1000, compression="none")
    size = (tmp_path / "big.parquet").stat().st_size
    reads: list[int] = []

    class Recorded(io.FileIO):
        def read(self, n=-1):
            data = super().read(n)
            reads.append(len(data))
            return data

    monkeypatch.setattr(corpus_module.Corpus, "_open", staticmethod(lambda file: Recorded(file.path, "rb")))
    corpus = Corpus(find_files(str(tmp_path / "big.parquet")))
    assert sum(1 for _ in corpus.documents()) == 16_000
    assert size > 15e6 and 0 < max(reads) < size / 8, (size, max(reads))


def test_hashing_a_file_streams_it(tmp_path):
    """`sha256_of` (the key's digest of each file, and the cache's checksums) reads in pieces of READ_CHUNK."""
    data = np.random.default_rng(0).bytes(5 * corpus_module.READ_CHUNK + 7)
    (tmp_path / "blob").write_bytes(data)
    started = time.perf_counter()
    tracemalloc.start()
    try:
        digest = corpus_module.sha256_of(tmp_path / "blob")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert digest == hashlib.sha256(data).hexdigest() and peak < 2 * corpus_module.READ_CHUNK + (1 << 16)
    assert time.perf_counter() - started < 5


def logged(caplog) -> str:
    """Every message logged so far, joined (other loggers' info lines may come after the warning looked for)."""
    return "\n".join(record.getMessage() for record in caplog.records)
