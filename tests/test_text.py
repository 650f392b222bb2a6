"""The text task against independent computations: tokenizer round trips, reading each file format and each bad
input, the token cache (reuse, rebuild, crash safety), packing against a brute-force unpacking, determinism and the
held-out split, resuming and per-process slicing of the grain pipeline, and the metrics by position."""

from __future__ import annotations

import dataclasses
import json
import logging

import jax
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sleeplm.data import TASKS, TextConfig, make_source, save_run_files, task_of, vocabulary_size
from sleeplm.data import corpus as corpus_module
from sleeplm.data.common import is_held_out
from sleeplm.data.corpus import Corpus, TokenCache, cached_tokenizer, cached_tokens, find_files, write_atomically
from sleeplm.data.packing import PackedRows
from sleeplm.data.text import position_buckets, text_metrics
from sleeplm.data.tokenizer import decode, encode, load_tokenizer, train_tokenizer
from sleeplm.experiment.overrides import override_experiment
from sleeplm.experiment.schema import align_task_and_model, experiment_from_json
from sleeplm.training.presets import build_experiment
from sleeplm.training.run import train_iterator

VOCAB = 300
WORDS = ["the", "of", "sleep", "window", "token", "memory", "fast", "weight", "attention", "delta", "rule", "pass"]


def prose(rng: np.random.Generator, words: int) -> str:
    return " ".join(rng.choice(WORDS, words)) + ".\n"


def write_corpus(directory, documents: int = 40, seed: int = 0) -> list[str]:
    """`documents` JSONL documents of varied lengths in two files under nested directories; returns their texts."""
    rng = np.random.default_rng(seed)
    texts = [prose(rng, int(rng.integers(1, 120))) for _ in range(documents)]
    for part, chunk in (("a", texts[: documents // 2]), ("b/c", texts[documents // 2 :])):
        (directory / part).mkdir(parents=True, exist_ok=True)
        lines = [json.dumps({"text": text, "id": i}) for i, text in enumerate(chunk)]
        (directory / part / "docs.jsonl").write_text("\n".join(lines) + "\n")
    return texts


def text_config(tmp_path, **changes) -> TextConfig:
    settings = dict(files=str(tmp_path / "corpus" / "**" / "*.jsonl"), exclude="", vocab_size=VOCAB, windows=3)
    settings |= dict(window=8, cache_dir=str(tmp_path / "cache"))
    return TextConfig(**settings | changes)


@pytest.fixture
def corpus_texts(tmp_path):
    return write_corpus(tmp_path / "corpus")


# ---------------------------------------------------------------------------------------------------- tokenizer


def odd_strings(rng: np.random.Generator) -> list[str]:
    """Random Unicode (no lone surrogates), emoji, NUL and control characters, the special tokens' names as text,
    and random bytes decoded as UTF-8 with replacement."""
    planes = [(0, 0x80), (0x80, 0x800), (0x800, 0xD800), (0xE000, 0x10000), (0x10000, 0x110000)]
    strings = ["", "\x00", "\x00\x01\x1b[0m\x7f", "<eos><pad> <eos>", "😀👍🏽 🇫🇷 é e\u0301", "\ufeff\u200b\r\n\t"]
    for _ in range(30):
        low, high = planes[int(rng.integers(len(planes)))]
        strings.append("".join(chr(int(c)) for c in rng.integers(low, high, int(rng.integers(1, 40)))))
        strings.append(rng.bytes(int(rng.integers(1, 60))).decode("utf-8", errors="replace"))
    return strings


def test_tokenizer_round_trip_is_lossless_and_never_emits_special_tokens(tmp_path, corpus_texts):
    path = tmp_path / "tokenizer.json"
    trained = train_tokenizer(corpus_texts, VOCAB, path)
    tokenizer = load_tokenizer(path, expected_vocab_size=VOCAB)
    assert tokenizer.get_vocab_size() == VOCAB and trained.get_vocab_size() == VOCAB
    assert (tokenizer.token_to_id("<pad>"), tokenizer.token_to_id("<eos>")) == (0, 1)
    for text in corpus_texts + odd_strings(np.random.default_rng(1)):
        ids = encode(tokenizer, text)
        assert ids.dtype == np.int32 and np.all((ids >= 2) & (ids < VOCAB)), text
        assert decode(tokenizer, ids) == text
    assert len(encode(tokenizer, corpus_texts[0])) < len(corpus_texts[0].encode())  # merges were learned
    with pytest.raises(ValueError, match=r"lone surrogate '\\udc80' at character 2"):
        encode(tokenizer, "ab\udc80")


def test_tokenizer_files_that_do_not_fit_fail_naming_the_file(tmp_path, corpus_texts):
    path = tmp_path / "tokenizer.json"
    train_tokenizer(corpus_texts, VOCAB, path)
    with pytest.raises(
        ValueError, match=rf"tokenizer file {path} has 300 tokens, but the config expects vocab_size=512"
    ):
        load_tokenizer(path, expected_vocab_size=512)
    with pytest.raises(ValueError, match=r"tokenizer file .*missing.json does not exist"):
        load_tokenizer(tmp_path / "missing.json")
    with pytest.raises(ValueError, match=r"vocab_size=5000 is too large for this corpus: .* found only \d+ tokens"):
        train_tokenizer(corpus_texts, 5000, tmp_path / "big.json")
    assert not (tmp_path / "big.json").exists()
    config = text_config(tmp_path, tokenizer=str(path), vocab_size=512)
    with pytest.raises(ValueError, match=rf"tokenizer file {path} has 300 tokens"):
        make_source(config)


# ---------------------------------------------------------------------------------------------------- reading


def test_each_format_reads_its_documents_in_file_order(tmp_path):
    root = tmp_path / "mixed"
    (root / "deep" / "er").mkdir(parents=True)
    (root / "a.txt").write_text("plain text\nall one document\n")
    (root / "deep" / "b.jsonl").write_text('{"body": "first"}\n\n{"body": "second", "x": 1}\n')
    pq.write_table(pa.table({"body": ["row zero", "row one"], "n": [0, 1]}), root / "deep" / "er" / "c.parquet")
    pq.write_table(pa.table({"body": [b"bytes row"]}), root / "deep" / "er" / "d.parquet")
    (root / "skip.md").write_text("not matched by the glob")
    files = find_files(str(root / "**" / "*.*[tlq]"), exclude=str(root / "**" / "*.md"))
    assert [f.path for f in files] == sorted(
        str(p) for p in (root / "a.txt", root / "deep/b.jsonl", root / "deep/er/c.parquet", root / "deep/er/d.parquet")
    )
    assert all(f.size == (tmp_path / f.path).stat().st_size for f in files)
    documents = list(Corpus(files, text_field="body").documents())
    assert documents == [
        (0, "plain text\nall one document\n"),
        (1, "first"),
        (1, "second"),
        (2, "row zero"),
        (2, "row one"),
        (3, "bytes row"),
    ]


def read_all(path, **settings):
    return list(Corpus(find_files(str(path)), **settings).documents())


@pytest.mark.parametrize(
    ("name", "content", "settings", "message"),
    [
        ("a.txt", b"ok \xff\xfe there", {"decode_errors": "strict"}, r"a.txt: byte 3 is not UTF-8"),
        ("a.jsonl", b'{"text": "x"}\n{"text": 1}\n', {}, r"a.jsonl:2: field 'text' holds int, not a string"),
        ("a.jsonl", b'{"text": "x"}\n{"text": "y"\n', {}, r"a.jsonl:2: is not JSON"),
        ("a.jsonl", b'{"text": "x"}\n{"body": "y"}\n', {}, r"a.jsonl:2: has no field 'text' \(text_field\)"),
        ("a.jsonl", b'["text"]\n', {}, r"a.jsonl:1: has no field 'text'"),
        ("a.jsonl", b'{"body": "y"}\n', {"text_field": "content"}, r"a.jsonl:1: has no field 'content'"),
        ("a.parquet", b"not parquet at all", {}, r"a.parquet: is not a Parquet file"),
    ],
)
def test_bad_input_fails_naming_the_file_and_place(tmp_path, name, content, settings, message):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(ValueError, match=message):
        read_all(tmp_path / name, **settings)


def test_bad_parquet_columns_fail_naming_the_file(tmp_path):
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "a.parquet")
    with pytest.raises(ValueError, match=r"a.parquet: has no column 'text' \(text_field\) in \['body'\]"):
        read_all(tmp_path / "a.parquet")
    pq.write_table(pa.table({"text": ["x", None]}), tmp_path / "b.parquet")
    with pytest.raises(ValueError, match=r"b.parquet row 1: column 'text' is null"):
        read_all(tmp_path / "b.parquet")
    pq.write_table(pa.table({"text": [1.5]}), tmp_path / "c.parquet")
    with pytest.raises(ValueError, match=r"c.parquet: column 'text' holds double, not text"):
        read_all(tmp_path / "c.parquet")


def test_no_match_fails_and_empty_or_undecodable_input_is_reported(tmp_path, caplog):
    with pytest.raises(ValueError, match=r"files='.*nothing/\*\*/\*.txt' matches no file"):
        find_files(str(tmp_path / "nothing" / "**" / "*.txt"))
    (tmp_path / "empty.txt").write_bytes(b"")
    with pytest.raises(ValueError, match=r"files='.*\*.txt' matches only empty files: .*empty.txt"):
        find_files(str(tmp_path / "*.txt"))
    (tmp_path / "blank.jsonl").write_text('{"text": ""}\n')
    (tmp_path / "latin.txt").write_bytes("caf\xe9 ok".encode("latin-1"))
    pq.write_table(pa.table({"text": pa.array([], pa.string())}), tmp_path / "rows.parquet")
    with caplog.at_level(logging.WARNING, logger="sleeplm.data.corpus"):
        cache = cached_tokens(*tokenizer_and_corpus(tmp_path, str(tmp_path / "*.*")), tmp_path / "cache")
    empty_message = next(r.getMessage() for r in caplog.records if "empty" in r.getMessage())
    assert "skipped 3 empty files or texts" in empty_message
    for skipped in ("empty.txt", "blank.jsonl:1", "rows.parquet"):
        assert str(tmp_path / skipped) in empty_message
    replaced = next(r.getMessage() for r in caplog.records if "U+FFFD" in r.getMessage())
    assert f"{tmp_path / 'latin.txt'} (1 from byte 3)" in replaced
    assert cache.manifest["empty"] == [str(tmp_path / s) for s in ("blank.jsonl:1", "empty.txt", "rows.parquet")]
    tokenizer = load_tokenizer(cache.tokenizer_path)
    assert [decode(tokenizer, cache.document(d)) for d in range(len(cache))] == ["caf\ufffd ok<eos>"]


def test_a_file_deleted_or_changed_while_the_corpus_is_read_fails_naming_it(tmp_path, corpus_texts):
    corpus = Corpus(find_files(str(tmp_path / "corpus" / "**" / "*.jsonl")))
    (tmp_path / "corpus" / "a" / "docs.jsonl").write_text('{"text": "edited"}\n')
    with pytest.raises(ValueError, match=r"a/docs.jsonl changed while the corpus was read"):
        list(corpus.documents())
    corpus = Corpus(find_files(str(tmp_path / "corpus" / "**" / "*.jsonl")))
    (tmp_path / "corpus" / "b" / "c" / "docs.jsonl").unlink()
    with pytest.raises(ValueError, match=r"b/c/docs.jsonl was deleted while the corpus was read"):
        list(corpus.documents())


# ---------------------------------------------------------------------------------------------------- token cache


def tokenizer_and_corpus(tmp_path, pattern: str, vocab_size: int = 258):
    corpus = Corpus(find_files(pattern))
    return corpus, cached_tokenizer(corpus, vocab_size, 1 << 20, tmp_path / "cache")


def count_builds(monkeypatch) -> list[int]:
    builds: list[int] = []
    write = corpus_module.write_tokens
    monkeypatch.setattr(corpus_module, "write_tokens", lambda *a: builds.append(1) or write(*a))
    return builds


def expected_documents(tokenizer, texts) -> list[list[int]]:
    return [[*encode(tokenizer, text).tolist(), tokenizer.token_to_id("<eos>")] for text in texts]


def cached_documents(cache) -> list[list[int]]:
    return [cache.document(d).tolist() for d in range(len(cache))]


def test_token_cache_holds_the_tokenized_documents_and_is_reused_until_a_file_changes(
    tmp_path, corpus_texts, monkeypatch
):
    builds = count_builds(monkeypatch)
    config = text_config(tmp_path)
    first = make_source(config).cache
    tokenizer = load_tokenizer(first.tokenizer_path)
    assert cached_documents(first) == expected_documents(tokenizer, corpus_texts)
    assert first.tokens.dtype == np.uint16 and isinstance(first.tokens, np.memmap)
    again = make_source(config, "eval", size=1, held_out_fraction=0.3).cache
    assert builds == [1] and again.directory == first.directory

    changed = tmp_path / "corpus" / "a" / "docs.jsonl"
    changed.write_text(changed.read_text() + json.dumps({"text": "one more"}) + "\n")
    rebuilt = make_source(config).cache
    assert builds == [1, 1] and rebuilt.directory != first.directory
    texts = [*corpus_texts[:20], "one more", *corpus_texts[20:]]
    assert cached_documents(rebuilt) == expected_documents(load_tokenizer(rebuilt.tokenizer_path), texts)

    (tmp_path / "corpus" / "b" / "c" / "docs.jsonl").unlink()  # deleted between runs: the next run rebuilds
    shrunk = make_source(config).cache
    assert builds == [1, 1, 1]
    assert cached_documents(shrunk) == expected_documents(load_tokenizer(shrunk.tokenizer_path), texts[:21])


def test_a_build_that_crashes_midway_leaves_nothing_that_is_read(tmp_path, corpus_texts, monkeypatch):
    corpus, tokenizer_path = tokenizer_and_corpus(tmp_path, str(tmp_path / "corpus" / "**" / "*.jsonl"), VOCAB)

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(corpus_module.np, "save", crash)  # tokens.bin is written, the offsets are not
    with pytest.raises(OSError, match="disk full"):
        cached_tokens(corpus, tokenizer_path, tmp_path / "cache")
    monkeypatch.undo()
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [tokenizer_path.parent.name]
    cache = cached_tokens(corpus, tokenizer_path, tmp_path / "cache")
    assert cached_documents(cache) == expected_documents(load_tokenizer(tokenizer_path), corpus_texts)


def test_a_cache_another_process_finished_first_is_kept(tmp_path):
    final = tmp_path / "cache" / "tokens-key"

    def build(text: str):
        return lambda directory: (directory / "data").write_text(text) and {"built": text}

    write_atomically(final, build("first"))
    write_atomically(final, build("second"))  # the rename finds `final` there: the first build stays
    assert (final / "data").read_text() == "first" and json.loads((final / "manifest.json").read_text()) == {
        "built": "first"
    }
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["tokens-key"]


def test_a_damaged_cache_fails_naming_it(tmp_path, corpus_texts):
    """Loading a damaged cache directory fails naming it (`cached_tokens` checks the checksums first and rebuilds
    it: tests/test_cache.py)."""
    corpus, tokenizer_path = tokenizer_and_corpus(tmp_path, str(tmp_path / "corpus" / "**" / "*.jsonl"), VOCAB)
    cache = cached_tokens(corpus, tokenizer_path, tmp_path / "cache")
    with (cache.directory / "tokens.bin").open("r+b") as tokens:
        tokens.truncate(10)
    with pytest.raises(ValueError, match=rf"{cache.directory}/tokens.bin holds 10 bytes, not the \d+ uint16 tokens"):
        TokenCache.load(cache.directory)


# ---------------------------------------------------------------------------------------------------- packing


def unpack_row(row: dict, window: int, pad: int) -> list[list[int]]:
    """The documents of a row, read back position by position, checking the layout on the way: documents start at
    window boundaries, one right after another, and `position` counts each document's inputs from 0."""
    documents: list[list[int]] = []
    last_valid = -1
    for at in range(len(row["inputs"])):
        if row["document_start"][at]:
            assert at % window == 0 and row["valid"][at], at
            assert at == -(-(last_valid + 1) // window) * window, (last_valid, at)  # no window skipped
            documents.append([int(row["inputs"][at])])
        if row["valid"][at]:
            document = documents[-1]
            assert row["loss_mask"][at] == 1.0 and row["position"][at] == len(document) - 1, at
            assert document[-1] == row["inputs"][at], at
            document.append(int(row["targets"][at]))
            last_valid = at
        else:
            assert row["loss_mask"][at] == 0.0 and row["position"][at] == 0, at
            assert row["inputs"][at] == pad and row["targets"][at] == pad, at
    return documents


def pieces_of(document: list[int], row_length: int) -> list[list[int]]:
    if len(document) - 1 <= row_length:
        return [document]
    return [document[s : s + row_length + 1] for s in range(0, len(document) - 1, row_length)]


def first_fit_rows(pieces: list[list[int]], window: int, windows: int, seed: int, epoch: int) -> list[list[list[int]]]:
    """The rows of an epoch by the rule, scanning every open row: the pieces shuffled with (seed, epoch), each into
    the earliest-opened row with room for its windows, else into a new row."""
    rows: list[list[list[int]]] = []
    free: list[int] = []
    for index in np.random.default_rng([seed, epoch]).permutation(len(pieces)):
        need = -(-(len(pieces[index]) - 1) // window)
        row = next((r for r in range(len(rows)) if free[r] >= need), None)
        if row is None:
            rows.append([])
            free.append(windows)
            row = len(rows) - 1
        rows[row].append(pieces[index])
        free[row] -= need
    return rows


@pytest.mark.parametrize(("window", "windows"), [(4, 3), (5, 1), (3, 6)])
def test_packed_rows_unpack_into_the_pieces_of_every_document_once_per_epoch(window, windows):
    rng = np.random.default_rng(window * windows)
    row_length = window * windows
    lengths = [2, window, window + 1, window + 2, row_length, row_length + 1, row_length + 2, 3 * row_length + 5]
    lengths += rng.integers(2, 3 * row_length, 40).tolist()
    documents = [rng.integers(2, 50, n).tolist() for n in lengths]
    tokens = np.asarray([t for d in documents for t in d], np.uint16)
    starts = np.cumsum([0, *lengths[:-1]])
    rows = PackedRows(tokens, starts, lengths, window, windows, pad_id=0, seed=7)
    pieces = [piece for d in documents for piece in pieces_of(d, row_length)]
    assert all(1 < len(p) <= row_length + 1 for p in pieces)
    first = 0
    for epoch in range(2):
        count = rows.rows_in_epoch(epoch)
        unpacked = [unpack_row(rows[i], window, 0) for i in range(first, first + count)]
        assert all(row for row in unpacked)  # no empty row
        assert sorted(d for row in unpacked for d in row) == sorted(pieces), epoch
        assert unpacked == first_fit_rows(pieces, window, windows, seed=7, epoch=epoch)
        first += count
    rows_again = PackedRows(tokens, starts, lengths, window, windows, pad_id=0, seed=7)
    assert all(np.array_equal(rows[i]["inputs"], rows_again[i]["inputs"]) for i in range(first - 1, -1, -1))


def rows_of(source, count: int) -> np.ndarray:
    return np.stack([source[i]["inputs"] for i in range(count)])


def documents_of(source, count: int, pad: int = 0) -> set[tuple[int, ...]]:
    return {tuple(d) for i in range(count) for d in unpack_row(source[i], source.config.window, pad)}


def test_rows_are_deterministic_from_the_seed_and_splits_hold_disjoint_documents(tmp_path, corpus_texts):
    config = text_config(tmp_path)
    train, again = (make_source(config, seed=3, held_out_fraction=0.3) for _ in range(2))
    other = make_source(config, seed=4, held_out_fraction=0.3)
    count = train.rows.rows_in_epoch(0)
    np.testing.assert_array_equal(rows_of(train, 2 * count), rows_of(again, 2 * count))
    assert not np.array_equal(rows_of(train, count), rows_of(other, count))
    assert not np.array_equal(rows_of(train, count), rows_of(train, 2 * count)[count:])  # epochs are reshuffled

    held_out_rows = make_source(config, "eval", seed=3, size=1, held_out_fraction=0.3).rows.rows_in_epoch(0)
    held_out = make_source(config, "eval", seed=3, size=held_out_rows, held_out_fraction=0.3)
    documents = expected_documents(load_tokenizer(train.cache.tokenizer_path), corpus_texts)
    out = [is_held_out(text.encode(), 0.3) for text in corpus_texts]
    assert 0 < sum(out) < len(out)
    row_length = config.sequence_length
    pieces = lambda held: {
        tuple(p) for d, o in zip(documents, out, strict=True) if o == held for p in pieces_of(d, row_length)
    }
    assert documents_of(held_out, held_out_rows) == pieces(True)
    assert documents_of(train, count) == documents_of(other, other.rows.rows_in_epoch(0)) == pieces(False)
    with pytest.raises(ValueError, match=r"held-out split of files=.* packs into \d+ rows, fewer than the 1000 asked"):
        make_source(config, "eval", size=1000, held_out_fraction=0.3)


# ---------------------------------------------------------------------------------------------------- the pipeline


def text_experiment(tmp_path, batch_size: int = 4):
    config = text_config(tmp_path)
    overrides = {"train.batch_size": str(batch_size), "sleep.window": str(config.window)}
    experiment = align_task_and_model(
        override_experiment(dataclasses.replace(build_experiment("lm-cpu"), task=config), overrides)
    )
    assert experiment.task == config and experiment.config.model.vocab_size == VOCAB
    return experiment


def test_resuming_the_iterator_gives_the_rows_of_an_uninterrupted_run(tmp_path, corpus_texts):
    experiment = text_experiment(tmp_path)
    straight = [next(iterator) for iterator in [train_iterator(experiment)] for _ in range(8)]
    interrupted = train_iterator(experiment)
    for _ in range(3):
        next(interrupted)
    state = interrupted.get_state()
    resumed = train_iterator(experiment)
    resumed.set_state(state)
    for expected in straight[3:]:
        got = next(resumed)
        assert set(got) == set(expected)
        for key in expected:
            np.testing.assert_array_equal(got[key], expected[key])
    source = make_source(experiment.task, seed=experiment.train.seed)
    np.testing.assert_array_equal(straight[5]["inputs"], rows_of(source, 24)[20:24])  # batch k: rows [kB, (k+1)B)


def test_each_process_loads_its_half_of_every_global_batch(tmp_path, corpus_texts, monkeypatch):
    experiment = text_experiment(tmp_path)
    whole = train_iterator(experiment)
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    halves = []
    for index in (0, 1):
        monkeypatch.setattr(jax, "process_index", lambda index=index: index)
        halves.append(train_iterator(experiment))
    for _ in range(4):
        batch, first, second = next(whole), next(halves[0]), next(halves[1])
        for key in batch:
            np.testing.assert_array_equal(np.concatenate([first[key], second[key]]), batch[key])


def test_run_files_are_copied_and_a_resume_on_a_changed_corpus_fails(tmp_path, corpus_texts):
    given = tmp_path / "given.json"
    train_tokenizer(corpus_texts, VOCAB, given)
    config = text_config(tmp_path, tokenizer=str(given))  # so the corpus changes and the tokenizer does not
    workdir = tmp_path / "run"
    workdir.mkdir()
    save_run_files(config, workdir, resumed=False)
    assert (workdir / "tokenizer.json").read_bytes() == given.read_bytes()
    corpus = json.loads((workdir / "corpus.json").read_text())
    assert [f[0] for f in corpus["corpus"]["files"]] == [str(p) for p in sorted((tmp_path / "corpus").rglob("*.jsonl"))]
    save_run_files(config, workdir, resumed=True)  # same corpus: resumes
    (tmp_path / "corpus" / "a" / "docs.jsonl").write_text('{"text": "changed"}\n')
    with pytest.raises(ValueError, match=r"run/corpus.json differs from .*: the task's corpus.json changed since"):
        save_run_files(config, workdir, resumed=True)
    save_run_files(config, workdir, resumed=False)  # a fresh run takes the new corpus


# ---------------------------------------------------------------------------------------------------- task, metrics


def test_position_buckets_double_from_the_second_window():
    assert position_buckets(8 * 4, 4) == [
        ("pos0-L", 0, 4),
        ("posL-2L", 4, 8),
        ("pos2L-4L", 8, 16),
        ("pos4L-8L", 16, 32),
    ]
    assert [name for name, _, _ in position_buckets(5 * 4, 4)][-1] == "pos4L-8L"
    assert position_buckets(3, 4) == [("pos0-L", 0, 4)]


def test_metrics_by_position_match_a_loop_over_tokens():
    rng = np.random.default_rng(0)
    window, examples_count, length = 4, 6, 40
    position = rng.integers(0, 60, (examples_count, length)).astype(np.int32)
    mask = (rng.random((examples_count, length)) < 0.8).astype(np.float32)
    right = (rng.random((examples_count, length)) < 0.5) & (mask > 0)
    token_loss = rng.random((examples_count, length)).astype(np.float32) * mask
    results = {"loss_sum": token_loss.sum(1), "labels": mask.sum(1), "right": right, "token_loss": token_loss}
    examples = {"position": position, "loss_mask": mask, "window": np.full(examples_count, window, np.int32)}
    metrics = text_metrics(results, examples)
    sums: dict[str, list[float]] = {}
    for e in range(examples_count):
        for t in range(length):
            if mask[e, t]:
                p = int(position[e, t]) // window
                name = {0: "pos0-L", 1: "posL-2L"}.get(p, f"pos{2 ** (p.bit_length() - 1)}L-{2 ** p.bit_length()}L")
                sums.setdefault(name, []).append((float(right[e, t]), float(token_loss[e, t])))
    for name, values in sums.items():
        assert metrics[f"accuracy@{name}"] == pytest.approx(np.mean([v[0] for v in values]), rel=1e-12)
        assert metrics[f"loss@{name}"] == pytest.approx(np.mean([v[1] for v in values]), rel=1e-6)
    assert {k for k in metrics if "@" in k} == {f"{m}@{n}" for n in sums for m in ("accuracy", "loss")}
    assert metrics["perplexity"] == pytest.approx(np.exp(token_loss.sum() / mask.sum()), rel=1e-6)
    without_losses = text_metrics({k: v for k, v in results.items() if k != "token_loss"}, examples)
    assert not any(k.startswith("loss@") for k in without_losses)


def test_the_text_task_is_registered_and_its_config_validated(tmp_path):
    assert task_of(TextConfig()) is TASKS["text"] and TASKS["text"].name == "text"
    experiment = build_experiment("lm-cpu", {"task.vocab_size": "1024", "sleep.window": "32"})
    assert experiment.config.model.vocab_size == vocabulary_size(experiment.task) == 1024
    assert experiment.task.window == 32 and experiment.task.sequence_length == 32 * experiment.task.windows
    assert experiment_from_json(json.loads(json.dumps(experiment.to_json()))) == experiment
    for preset in ("lm", "lm-cpu"):
        assert build_experiment(preset).config.model.vocab_size == build_experiment(preset).task.vocab_size
    for changes, message in (
        ({"vocab_size": 100}, r"task.vocab_size=100 is invalid: must be an integer >= 258"),
        ({"decode_errors": "ignore"}, r"task.decode_errors='ignore' is invalid: allowed are \('replace', 'strict'\)"),
        ({"windows": 0}, r"task.windows=0 is invalid"),
        ({"files": ""}, r"task.files='' is invalid"),
    ):
        with pytest.raises(ValueError, match=message):
            TextConfig(**changes)


def test_a_text_run_generates_with_its_own_tokenizer_and_refuses_a_missing_or_mismatched_one(
    tmp_path, corpus_texts, capsys
):
    """A run directory (its experiment, a checkpoint, its run files) made without training: `sleeplm generate`
    encodes the prompt and decodes the output with the workdir's tokenizer.json, and fails naming the file when it
    is missing or has another vocabulary size than the model."""
    from sleeplm.cli.main import main as cli_main
    from sleeplm.training.checkpoint import Checkpointer
    from sleeplm.training.step import init_train_state

    experiment = text_experiment(tmp_path)
    small = dataclasses.replace(experiment.config.model, d_model=16, num_heads=2, mlp_dim=32)
    experiment = dataclasses.replace(experiment, config=dataclasses.replace(experiment.config, model=small))
    run = tmp_path / "run"
    run.mkdir()
    (run / "experiment.json").write_text(json.dumps(experiment.to_json()))
    save_run_files(experiment.task, run, resumed=False)
    state = init_train_state(jax.random.key(0), experiment.config, experiment.train)
    Checkpointer(run / "checkpoints", keep=1).save(state, train_iterator(experiment), experiment)
    tokenizer = load_tokenizer(run / "tokenizer.json")

    cli_main(["generate", "--workdir", str(run), "--prompt", "the fast sleep", "--max-new-tokens", "4"])
    row = json.loads(capsys.readouterr().out)
    assert len(row["ids"]) == 4 and row["text"] == decode(tokenizer, row["ids"])
    (run / "tokenizer.json").rename(tmp_path / "kept.json")
    with pytest.raises(SystemExit, match=r"run/tokenizer.json"):
        cli_main(["generate", "--workdir", str(run), "--prompt", "the"])
    train_tokenizer(corpus_texts, VOCAB - 20, run / "tokenizer.json")
    with pytest.raises(SystemExit, match=r"run/tokenizer.json.*280.*300|run/tokenizer.json.*300.*280"):
        cli_main(["generate", "--workdir", str(run), "--prompt", "the"])


def test_eval_uses_the_runs_tokenizer_and_refuses_a_corpus_changed_since_training(tmp_path, corpus_texts, capsys):
    """`sleeplm eval` rebuilds a text run's held-out data with the run's own tokenizer.json, never one trained anew
    on the corpus as it is now; when a file was added to the corpus since training it fails naming corpus.json and
    the file, unless asked for the current corpus (`--current-corpus`), which it then reads with the run's
    tokenizer."""
    import hashlib

    from sleeplm.cli.main import main as cli_main
    from sleeplm.training.run import run_training

    experiment = text_experiment(tmp_path)
    small = dataclasses.replace(experiment.config.model, d_model=16, num_heads=2, mlp_dim=32)
    train = dataclasses.replace(experiment.train, steps=2, warmup_steps=0)
    settings = dict(eval_every=2, eval_examples=4, eval_batch_size=4, checkpoint_every=2, log_every=1, progress=False)
    experiment = dataclasses.replace(
        experiment,
        config=dataclasses.replace(experiment.config, model=small),
        train=train,
        run=dataclasses.replace(experiment.run, **settings),
    )
    run = tmp_path / "run"
    run_training(experiment, run)
    tokenizers = lambda: sorted((tmp_path / "cache").glob("tokenizer-*"))
    assert len(tokenizers()) == 1
    cli_main(["eval", "--workdir", str(run)])  # the corpus as trained on
    assert json.loads((run / "eval_step2.json").read_text())["step"] == 2

    added = tmp_path / "corpus" / "d" / "new.jsonl"
    added.parent.mkdir()
    rng = np.random.default_rng(1)
    added.write_text("".join(json.dumps({"text": prose(rng, 60)}) + "\n" for _ in range(20)))
    with pytest.raises(SystemExit, match=r"run/corpus.json: added .*d/new.jsonl.*--current-corpus"):
        cli_main(["eval", "--workdir", str(run)])
    capsys.readouterr()
    cli_main(["eval", "--workdir", str(run), "--current-corpus"])
    assert len(tokenizers()) == 1  # no tokenizer was trained on the changed corpus
    run_tokenizer = hashlib.sha256((run / "tokenizer.json").read_bytes()).hexdigest()
    caches = [json.loads((c / "manifest.json").read_text()) for c in (tmp_path / "cache").glob("tokens-*")]
    assert len(caches) == 2 and {c["tokenizer_sha256"] for c in caches} == {run_tokenizer}
    assert any(added.as_posix() in [f[0] for f in c["corpus"]["files"]] for c in caches)
