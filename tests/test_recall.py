"""The recall task against an independent oracle that re-reads the token stream (latest value per key, hops
followed), its recorded positions and distances against the stream, its knobs' errors, determinism, its metrics, and
a short training run."""

from __future__ import annotations

import collections
import dataclasses
import json
import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from sleeplm.data import make_source, task_of
from sleeplm.data.recall import RecallConfig
from sleeplm.training import run as loop
from sleeplm.training.presets import PRESETS, build_experiment


def read_stream(text: list[str]) -> tuple[list[dict], dict[str, list[tuple[int, str]]]]:
    """Left to right: every `<fact> key value` sets key's latest value; every `<ask> key` is answered by following
    latest values from key until a value token. Returns per query (asked key, the given answer, the oracle's answer,
    the answer's index, the positions of the facts followed) and every key's assignments (position, value)."""
    latest, assignments, queries = {}, collections.defaultdict(list), []
    i = 0
    while i < len(text):
        if text[i] == "<fact>":
            key, value = text[i + 1], text[i + 2]
            latest[key] = (value, i)
            assignments[key].append((i, value))
            i += 3
        elif text[i] == "<ask>":
            item, followed = text[i + 1], []
            while item.startswith("k"):
                assert len(followed) <= len(latest), "the facts form a cycle"
                item, position = latest[item]
                followed.append(position)
            queries.append(dict(key=text[i + 1], given=text[i + 2], answer=item, at=i + 2, followed=followed))
            i += 3
        else:
            assert text[i].startswith("f"), text[i]
            i += 1
    return queries, assignments


@st.composite
def configs(draw) -> RecallConfig:
    fact_windows = draw(st.integers(1, 5))
    min_distance = draw(st.integers(1, 3))
    max_distance = min_distance + fact_windows - 1
    pairs = draw(st.integers(1, 4))
    hops = draw(st.integers(1, fact_windows))
    queries = draw(st.integers(1, fact_windows * pairs // hops))
    overwrites = draw(st.integers(0, min(queries * hops, fact_windows * pairs - queries * hops)))
    return RecallConfig(
        windows=max_distance + draw(st.integers(0, 2)),
        pairs_per_window=pairs,
        min_distance=min_distance,
        max_distance=max_distance,
        queries=queries,
        hops=hops,
        overwrites=overwrites,
        key_tokens=fact_windows * pairs - overwrites + draw(st.integers(0, 3)),
        value_tokens=draw(st.integers(2, 6)),
        filler_tokens=draw(st.integers(1, 4)),
        window=3 * pairs + draw(st.integers(0, 6)),
    )


def text_of(example, config: RecallConfig) -> list[str]:
    return config.vocab.decode([*example["inputs"], example["targets"][-1]])


@given(configs(), st.integers(0, 2**31), st.integers(0, 1000))
def test_labels_match_a_brute_force_oracle(config, seed, index):
    example = make_source(config, "train", seed=seed)[index]
    text = text_of(example, config)
    assert len(example["inputs"]) == config.sequence_length
    queries, _ = read_stream(text)
    assert len(queries) == config.queries
    assert np.array_equal(np.flatnonzero(example["loss_mask"]), [q["at"] - 1 for q in queries])
    assert [q["given"] for q in queries] == [q["answer"] for q in queries]
    assert [text[q["at"]] for q in queries] == config.vocab.decode(example["targets"][example["loss_mask"] > 0])


@given(configs(), st.integers(0, 2**31), st.integers(0, 1000))
def test_recorded_positions_and_distances_match_the_stream(config, seed, index):
    example = make_source(config, "train", seed=seed)[index]
    text, window = text_of(example, config), config.window
    queries, assignments = read_stream(text)
    first_query_window = config.windows  # the queries start at this window's first token
    assert text[config.windows * window] == "<ask>"
    facts = [i for i, token in enumerate(text) if token == "<fact>"]
    per_window = collections.Counter(i // window for i in facts)
    fact_windows = range(first_query_window - config.max_distance, first_query_window - config.min_distance + 1)
    assert per_window == {w: config.pairs_per_window for w in fact_windows}
    for q, query in enumerate(queries):
        assert list(example["fact_position"][q]) == query["followed"]
        assert len(query["followed"]) == config.hops
        assert len({position // window for position in query["followed"]}) == config.hops  # hops in distinct windows
        distances = [(query["at"] - 1) // window - position // window for position in query["followed"]]
        assert list(example["fact_distance"][q]) == distances
        assert example["distance"][q] == max(distances) >= 1  # every fact was evicted before its query
        from_first_query = [first_query_window - position // window for position in query["followed"]]
        assert all(config.min_distance <= d <= config.max_distance for d in from_first_query)
        keys = [text[position + 1] for position in query["followed"]]
        assert example["overwritten"][q] == any(len(assignments[key]) > 1 for key in keys)
    reassigned = {key: values for key, values in assignments.items() if len(values) > 1}
    assert sum(len(values) - 1 for values in reassigned.values()) == config.overwrites
    chain_keys = {text[position + 1] for query in queries for position in query["followed"]}
    assert set(reassigned) <= chain_keys  # only queried chains' facts are overwritten
    answers = {text[position + 1]: query["answer"] for query in queries for position in query["followed"]}
    assert all(values[0][1] != answers[key] for key, values in reassigned.items())  # a stale value is never right


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"pairs_per_window": 0}, r"task\.pairs_per_window=0"),
        ({"pairs_per_window": 6}, r"task\.pairs_per_window=6 is invalid: 6 facts of 3 tokens do not fit"),
        ({"min_distance": 0}, r"task\.min_distance=0"),
        ({"min_distance": 3, "max_distance": 2}, r"task\.min_distance=3 is invalid: must be <= max_distance=2"),
        ({"max_distance": 4}, r"task\.max_distance=4 is invalid: must be <= windows=3"),
        ({"overwrites": -1}, r"task\.overwrites=-1"),
        ({"overwrites": 5}, r"task\.overwrites=5 is invalid: must be <= queries x hops = 4"),
        ({"overwrites": 3}, r"task\.queries=4 is invalid: .* 7 facts exceed the 6 slots"),
        ({"hops": 4}, r"task\.hops=4 is invalid: .* only 3 windows hold facts"),
        ({"hops": 2}, r"task\.queries=4 is invalid: .* 8 facts exceed the 6 slots"),
        ({"key_tokens": 5}, r"task\.key_tokens=5 is invalid: an example needs 6 distinct keys"),
        ({"value_tokens": 1}, r"task\.value_tokens=1"),
        ({"filler_tokens": 0}, r"task\.filler_tokens=0"),
        ({"queries": 1.5}, r"task\.queries=1\.5"),
    ],
)
def test_bad_knobs_fail_naming_the_field(fields, message):
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(RecallConfig(), **fields)


def test_examples_are_a_function_of_seed_split_and_index():
    config = RecallConfig(windows=4, max_distance=4, hops=2, overwrites=2, queries=3)
    one, again = make_source(config, "train", seed=3), make_source(config, "train", seed=3)
    for index in (0, 7, 12345):
        a, b = one[index], again[index]
        assert a.keys() == b.keys() and all(np.array_equal(a[key], b[key]) for key in a)
    assert not np.array_equal(one[0]["inputs"], one[1]["inputs"])
    assert not np.array_equal(one[0]["inputs"], make_source(config, "train", seed=4)[0]["inputs"])
    held_out = make_source(config, "eval", seed=3)
    train = {one[i]["inputs"].tobytes() for i in range(200)}
    assert not train & {held_out[i]["inputs"].tobytes() for i in range(50)}


def test_metrics_report_accuracy_by_distance_and_on_overwritten_chains():
    config = RecallConfig(overwrites=1)
    examples = [make_source(config, "eval", size=8)[i] for i in range(8)]
    batch = {key: np.stack([e[key] for e in examples]) for key in examples[0]}
    right = np.zeros_like(batch["loss_mask"], bool)
    rows, columns = np.nonzero(batch["loss_mask"])
    right[rows, columns] = (batch["distance"] == 1).reshape(-1)  # right exactly on the queries at distance 1
    metrics = task_of(config).metrics({"right": right}, batch)
    assert set(np.unique(batch["distance"])) == {1, 2, 3}
    assert metrics["accuracy@dist1"] == 1.0 and metrics["accuracy@dist2"] == metrics["accuracy@dist3"] == 0.0
    overwritten = batch["overwritten"] > 0
    assert metrics["accuracy@overwritten"] == pytest.approx((batch["distance"][overwritten] == 1).mean())


def test_the_cpu_preset_is_the_plain_version():
    experiment = build_experiment("recall-cpu")
    task, model, sleep = experiment.task, experiment.config.model, experiment.config.sleep
    assert (task.windows, task.min_distance, task.max_distance, task.hops, task.overwrites) == (3, 1, 3, 1, 0)
    assert (model.d_model, experiment.train.batch_size, experiment.train.steps, sleep.eviction) == (64, 64, 800, "hard")
    assert PRESETS["recall-cpu"].task.window == sleep.window


@pytest.mark.slow  # about a minute on 2 shared cores: compiling the train and eval steps
def test_twenty_training_steps_on_a_tiny_config_have_a_finite_loss(tmp_path):
    tiny = {
        "sleep.window": "8",
        "sleep.passes": "2",
        "task.pairs_per_window": "1",
        "task.queries": "2",
        "model.d_model": "16",
        "model.num_heads": "2",
        "model.layers": "attn,gdn",
        "model.mlp_dim": "32",
        "train.steps": "20",
        "train.batch_size": "8",
        "train.warmup_steps": "2",
        "run.eval_every": "20",
        "run.eval_examples": "16",
        "run.eval_batch_size": "16",
        "run.checkpoint_every": "20",
        "run.progress": "false",
    }
    loop.run_training(build_experiment("recall-cpu", tiny), tmp_path)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = [record["loss"] for record in records if "loss" in record]
    assert losses and all(math.isfinite(loss) for loss in losses)
    assert any(key.startswith("accuracy@dist") for record in records for key in record)
