"""Property-based tests (Hypothesis) of the text task's corpus reading: JSONL rows with missing, null or non-string
fields, very long lines, bytes that are not UTF-8, empty files, Parquet columns of other types, files that are not
Parquet. The contract: `Corpus.documents()` yields (file index, non-empty text), or raises ValueError naming the file
(and the line or row); nothing else escapes. Examples per property: see tests/conftest.py."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from sleeplm.data.corpus import Corpus, find_files

json_leaves = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(), st.text(max_size=20), st.just("")
)
rows = st.one_of(
    st.fixed_dictionaries({"text": st.text(max_size=30)}),  # a good row
    st.fixed_dictionaries({"text": json_leaves}),  # null, a number, an empty text
    st.fixed_dictionaries({"text": st.lists(json_leaves, max_size=2)}),
    st.fixed_dictionaries({"body": st.text(max_size=5)}),  # the field missing
    json_leaves,  # not an object
    st.lists(json_leaves, max_size=2),
)
line_forms = st.one_of(
    rows.map(lambda row: json.dumps(row).encode()),
    st.just(b"{not json"),
    st.just(b"   "),
    st.just(b'{"text": "' + b"x" * 200_000 + b'"}'),  # a very long line
    st.binary(max_size=12),  # arbitrary bytes: invalid JSON, invalid UTF-8
    st.just(b'{"text": "caf\xe9"}'),  # a Latin-1 byte inside a valid row
)


@st.composite
def jsonl_files(draw):
    return b"\n".join(draw(st.lists(line_forms, max_size=5)))


@st.composite
def text_files(draw):
    return draw(st.one_of(st.binary(max_size=40), st.text(max_size=40).map(str.encode), st.just(b"")))


parquet_columns = st.sampled_from(
    [
        pa.array(["a", "b"]),
        pa.array(["a", None]),
        pa.array(["", "b"]),
        pa.array([1, 2]),
        pa.array([1.5, None]),
        pa.array([b"ok", b"\xff\xfe"]),
        pa.array(["a", "b"], pa.large_string()),
        pa.array([b"a", b""], pa.large_binary()),
        pa.array([["a"], ["b"]]),
        pa.array([{"x": "a"}, {"x": "b"}]),
        pa.array(["a", "b"]).dictionary_encode(),
        pa.array([None, None], pa.string()),
        pa.array([], pa.string()),
        pa.array([True, False]),
    ]
)


@st.composite
def parquet_files(draw):
    column = draw(parquet_columns)
    name = draw(st.sampled_from(["text", "text", "other"]))
    if draw(st.integers(0, 9)) == 0:
        return draw(st.binary(max_size=30))  # not a Parquet file
    sink = pa.BufferOutputStream()
    pq.write_table(pa.table({name: column}), sink)
    return sink.getvalue().to_pybytes()


files = st.lists(
    st.one_of(
        jsonl_files().map(lambda data: (".jsonl", data)),
        text_files().map(lambda data: (".txt", data)),
        parquet_files().map(lambda data: (".parquet", data)),
    ),
    min_size=1,
    max_size=4,
)


def read(directory: Path, decode_errors: str) -> list[tuple[int, str]] | None:
    """The documents of every file in `directory`, or None when reading failed with a ValueError naming a file (or,
    when every file is empty, the glob)."""
    try:
        corpus = Corpus(find_files(str(directory / "*")), "text", decode_errors)
        return list(corpus.documents())
    except ValueError as error:
        message = str(error)
        assert str(directory) in message, f"{message!r} names no file"
        return None


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(files, st.sampled_from(["replace", "strict"]))
@example([(".jsonl", b'{"text": null}')], "replace")
@example([(".jsonl", b'{"text": 5}\n{"body": "a"}')], "replace")
@example([(".jsonl", b'{"text": "caf\xe9"}')], "strict")
@example([(".parquet", b"PAR1 not parquet")], "replace")
@example([(".txt", b"")], "replace")
def test_a_corpus_reads_or_fails_naming_the_file(contents, decode_errors):
    with tempfile.TemporaryDirectory() as directory:
        directory = Path(directory)
        for i, (suffix, data) in enumerate(contents):
            (directory / f"f{i}{suffix}").write_bytes(data)
        documents = read(directory, decode_errors)
        if documents is not None:
            assert all(isinstance(text, str) and text for _, text in documents)
            assert all(0 <= index < len(contents) for index, _ in documents)


def test_a_deeply_nested_jsonl_line_fails_naming_file_and_line(tmp_path):
    (tmp_path / "deep.jsonl").write_bytes(b'{"text": "a"}\n' + b"[" * 100_000 + b"\n")
    with pytest.raises(ValueError, match=r"deep\.jsonl:2"):
        list(Corpus(find_files(str(tmp_path / "*"))).documents())
