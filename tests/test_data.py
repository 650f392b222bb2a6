"""Task generators against brute-force checks written independently (string rewriting, walking the edge list,
evaluating the statements), plus layout, distributions, determinism and train/eval disjointness."""

from __future__ import annotations

import collections
import dataclasses
import json
import re
from pathlib import Path

import numpy as np
import pytest

from sleeplm.data import (
    TASKS,
    ArithConfig,
    DepoConfig,
    Rule110Config,
    Task,
    TaskSource,
    batched,
    make_source,
    register_task,
    task_of,
)
from sleeplm.experiment.schema import experiment_from_json
from sleeplm.training.evaluate import eval_sets
from sleeplm.training.presets import build_experiment

RULE110_TABLE = {"111": "0", "110": "1", "101": "1", "100": "0", "011": "1", "010": "1", "001": "1", "000": "0"}


def text_of(example, vocab):
    return vocab.decode([*example["inputs"], example["targets"][-1]])


def label_positions(example):
    return np.flatnonzero(example["loss_mask"])


@pytest.mark.parametrize(
    "config",
    [Rule110Config(steps=0), Rule110Config(steps=5), Rule110Config(width=8, window=10, num_strings=3, steps=9)],
)
def test_rule110_labels_match_the_truth_table(config):
    source = make_source(config, "train", seed=1, size=50)
    for index in range(50):
        example = source[index]
        text = text_of(example, source.vocab)
        assert len(example["inputs"]) == config.sequence_length
        labels = []
        for i in range(config.num_strings):
            chunk = text[i * config.window : (i + 1) * config.window]
            assert chunk[: config.window - config.width] == ["<pad>"] * (config.window - config.width)
            cells = "".join(chunk[config.window - config.width :])
            for _ in range(config.steps):
                cells = "".join(
                    RULE110_TABLE[cells[j - 1] + cells[j] + cells[(j + 1) % len(cells)]] for j in range(len(cells))
                )
            labels.append(cells[0])
        query = config.num_strings * config.window
        assert text[query] == "<query>" and text[query + 1 :] == labels
        np.testing.assert_array_equal(label_positions(example), np.arange(query, query + config.num_strings))
        np.testing.assert_array_equal(example["targets"][label_positions(example)], source.vocab.encode(labels))


def is_node_name(token: str) -> bool:
    return re.fullmatch(r"n\d+", token) is not None


def read_depo(text, config):
    """(edges {src: dst}, queries [(hops, start, answer, end)]) of a decoded Depo example, after checking that the
    edge list is left-padded, names only node-name tokens, and forms a single cycle through every node."""
    edge_text = [t for t in text[: config.edge_block_length] if t != "<pad>"]
    assert all(t == "<pad>" for t in text[: config.edge_block_length - len(edge_text)])
    assert all(is_node_name(t) for t in edge_text), edge_text
    name, step = config.name_length, 2 * config.name_length
    edges = {
        tuple(edge_text[i : i + name]): tuple(edge_text[i + name : i + step]) for i in range(0, len(edge_text), step)
    }
    node, seen = next(iter(edges)), set()
    while node not in seen:
        seen.add(node)
        node = edges[node]
    assert seen == set(edges)
    query_length = 2 + 2 * name
    queries = []
    for q in range(config.queries):
        hop_token, *names, end = text[config.edge_block_length + q * query_length :][:query_length]
        assert re.fullmatch(r"<hop_\d+>", hop_token), hop_token
        assert all(is_node_name(t) for t in names), names
        queries.append((int(hop_token[len("<hop_") : -1]), tuple(names[:name]), tuple(names[name:]), end))
    return edges, queries


def walk(edges, node, hops):
    for _ in range(hops):
        node = edges[node]
    return node


def test_depo_answers_match_walking_the_cycle():
    config = DepoConfig(max_nodes=12, min_nodes=5, name_tokens=6, window=16, max_hops=16, queries=10)
    source = make_source(config, "train", seed=2, size=300)
    hop_counts = collections.Counter()
    for index in range(300):
        example = source[index]
        text = text_of(example, source.vocab)
        assert len(example["inputs"]) == config.sequence_length
        edges, queries = read_depo(text, config)
        assert config.min_nodes <= len(edges) <= config.max_nodes
        expected_positions = []
        for q, (hops, start, answer, end) in enumerate(queries):
            hop_counts[hops] += 1
            assert answer == walk(edges, start, hops) and end == "<eoq>"
            answer_at = config.edge_block_length + q * 6 + 3
            expected_positions += [answer_at - 1, answer_at]
            assert example["hops"][answer_at - 1] == example["hops"][answer_at] == hops
        np.testing.assert_array_equal(label_positions(example), expected_positions)
        assert np.all(example["hops"][example["loss_mask"] == 0] == 0)
    assert set(hop_counts) == set(range(1, 17))
    expected = 3000 / 16
    assert all(abs(count - expected) < 5 * np.sqrt(expected) for count in hop_counts.values())


def test_depo_per_hop_sets_are_encoded_with_the_training_vocabulary():
    """Each held-out set "k{k}" decodes, with the vocabulary the model trains on, into valid Depo examples whose
    every query is <hop_k> with the answer k steps along the edge list."""
    overrides = {"task.min_nodes": "6", "task.max_nodes": "8", "task.name_tokens": "16", "task.max_hops": "4"}
    overrides |= {"sleep.window": "16", "run.eval_examples": "64", "run.eval_batch_size": "32"}
    experiment = build_experiment("depo-cpu", overrides)
    config = experiment.task
    training_vocab = make_source(config, "train", size=1).vocab
    sets = eval_sets(experiment)
    assert list(sets) == ["all", "k1", "k2", "k4"]
    for name, batches in sets.items():
        examples = [{key: value[row] for key, value in batch.items()} for batch in batches for row in range(32)]
        assert len(examples) == 64
        for example in examples:
            edges, queries = read_depo(text_of(example, training_vocab), config)
            for hops, start, answer, end in queries:
                assert name == "all" or hops == int(name[1:])
                assert answer == walk(edges, start, hops) and end == "<eoq>"


def evaluate_statements(statements, modulus):
    """Resolves declarative statements by repeated sweeps until every variable has a value."""
    values, pending = {}, list(statements)
    while pending:
        unresolved = []
        for lhs, rhs in pending:
            if len(rhs) == 1:
                values[lhs] = int(rhs[0])
            elif rhs[0] in values and rhs[2] in values:
                a, op, b = values[rhs[0]], rhs[1], values[rhs[2]]
                values[lhs] = {"+": a + b, "-": a - b, "*": a * b}[op] % modulus
            else:
                unresolved.append((lhs, rhs))
        assert len(unresolved) < len(pending), "statements do not resolve"
        pending = unresolved
    return values


def closure_operations(variable, definitions):
    """Operations in the dependency closure of `variable`."""
    seen, stack, count = set(), [variable], 0
    while stack:
        name = stack.pop()
        if name in seen:
            continue
        seen.add(name)
        rhs = definitions[name]
        if len(rhs) == 3:
            count += 1
            stack += [rhs[0], rhs[2]]
    return count


def test_arith_answers_match_evaluating_the_statements():
    config = ArithConfig(num_vars=40, modulus=7, min_ops=0, max_ops=6, windows=3, window=32)
    source = make_source(config, "train", seed=3, size=600)
    ops_counts, answers = collections.Counter(), collections.Counter()
    for index in range(600):
        example = source[index]
        text = text_of(example, source.vocab)
        assert len(example["inputs"]) == config.sequence_length
        start = text.index("Q")
        assert all(t == "<pad>" for t in text[:start]) and text[start + 2] == ";"
        assert text[-3:-1] == ["A", ":"]
        body = " ".join(text[start + 3 : -3]).split(" ;")
        statements = [s.split() for s in body if s.strip()]
        definitions = {s[0]: s[2:] for s in statements}
        assert len(definitions) == len(statements), "a variable is defined twice"
        assert all(s[1] == "=" and len(s) in (3, 5) for s in statements)
        values = evaluate_statements(definitions.items(), config.modulus)
        queried = text[start + 1]
        assert text[-1] == str(values[queried]) and example["answer"] == values[queried]
        assert closure_operations(queried, definitions) == example["ops"]
        np.testing.assert_array_equal(label_positions(example), [len(text) - 2])
        ops_counts[int(example["ops"])] += 1
        answers[int(example["answer"])] += 1
    assert set(ops_counts) == set(range(7))
    assert max(ops_counts.values()) < 2 * min(ops_counts.values())
    assert max(answers.values()) / 600 < 1.6 / config.modulus  # the majority answer stays near chance


@pytest.mark.parametrize(
    "config",
    [
        Rule110Config(width=4, num_strings=2, window=4, steps=1),
        DepoConfig(max_nodes=4, min_nodes=3, name_tokens=3, window=8, max_hops=3, queries=1),
    ],
)
def test_train_and_eval_never_share_an_example_and_are_deterministic(config):
    train, evaluation = (
        make_source(config, "train", 0, 400, held_out_fraction=0.2),
        make_source(config, "eval", 0, 100, held_out_fraction=0.2),
    )
    key = lambda e: e["inputs"].tobytes()
    train_keys = {key(train[i]) for i in range(400)}
    eval_keys = {key(evaluation[i]) for i in range(100)}
    if isinstance(config, Rule110Config):  # content = the strings; labels follow from them
        strings = lambda k: np.frombuffer(k, np.int32)[: config.num_strings * config.window].tobytes()
        train_keys, eval_keys = {strings(k) for k in train_keys}, {strings(k) for k in eval_keys}
    assert train_keys and eval_keys and not train_keys & eval_keys
    again = make_source(config, "train", 0, 400, held_out_fraction=0.2)
    np.testing.assert_array_equal(again[17]["inputs"], train[17]["inputs"])
    other_seed = make_source(config, "train", 1, 400, held_out_fraction=0.2)
    assert any(not np.array_equal(other_seed[i]["inputs"], train[i]["inputs"]) for i in range(20))


def test_batched_dataset_is_deterministic():
    source = make_source(Rule110Config(steps=2), "train", 0, 64)
    first, second = batched(source, 16, seed=5), batched(source, 16, seed=5)
    assert len(first) == 4 and first[0]["inputs"].shape == (16, 100)
    np.testing.assert_array_equal(first[2]["inputs"], second[2]["inputs"])


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: Rule110Config(width=30, window=24), r"task.width=30 is invalid"),
        (lambda: Rule110Config(steps=-1), r"task.steps=-1 is invalid"),
        (lambda: DepoConfig(max_nodes=100, name_tokens=9), r"task.name_tokens=9 is invalid"),
        (lambda: DepoConfig(min_hops=5, max_hops=2), r"task.min_hops=5 is invalid"),
        (lambda: ArithConfig(windows=1, window=16), r"too short for max_ops=8"),
        (lambda: ArithConfig(min_ops=-1), r"task.min_ops=-1 is invalid: must be an integer >= 0"),
        (lambda: make_source(Rule110Config(), "test"), r"split='test' is invalid"),
        (lambda: make_source(Rule110Config(), "train", 0, 10, held_out_fraction=1.5), r"held_out_fraction=1.5"),
        (lambda: make_source("rule110"), r"task config of type str is not registered: registered tasks are rule110"),
        (lambda: make_source(DepoConfig(max_hops=4), "eval", hops=5), r"hops=5 is invalid: .* \[1, task.max_hops=4\]"),
        (  # 8 possible contents, none of which hashes into a 0.1% held-out set
            lambda: make_source(Rule110Config(width=3, num_strings=1, window=3), "eval", 0, 10, held_out_fraction=1e-3)[
                0
            ],
            r"no eval example found",
        ),
    ],
)
def test_bad_task_settings_fail_clearly(make, message):
    with pytest.raises((ValueError, RuntimeError), match=message):
        make()


def test_each_config_type_belongs_to_its_registered_task():
    assert list(TASKS)[:3] == ["rule110", "depo", "arith"]  # the built-ins; test files may register more
    for name, config in (("rule110", Rule110Config()), ("depo", DepoConfig()), ("arith", ArithConfig())):
        task = task_of(config)
        assert task is TASKS[name] and task.name == name and isinstance(make_source(config), task.source_type)
        assert make_source(config).vocab == config.vocab


@dataclasses.dataclass(frozen=True)
class NoWindowConfig:
    size: int = 1


@dataclasses.dataclass
class MutableConfig:
    window: int = 1


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: register_task(TASKS["depo"]), r"task name 'depo' is already registered"),
        (
            lambda: register_task(dataclasses.replace(TASKS["depo"], name="depo2")),
            r"its config type DepoConfig already belongs to task 'depo'",
        ),
        (lambda: register_task("depo"), r"expected a sleeplm.data.Task"),
        (lambda: Task("", DepoConfig, TaskSource), r"Task.name='' is invalid"),
        (
            lambda: Task("x", MutableConfig, TaskSource),
            r"Task.config_type=.*MutableConfig.* must be a frozen dataclass",
        ),
        (lambda: Task("x", NoWindowConfig, TaskSource), r"lacks \['window', 'sequence_length', 'vocab'\]"),
        (lambda: Task("x", DepoConfig, dict), r"Task.source_type=<class 'dict'> .* must be a TaskSource subclass"),
        (lambda: experiment_from_json({"task_name": "nope"}), r"task_name='nope' is unknown: registered tasks are"),
    ],
)
def test_bad_task_registrations_fail_clearly(make, message):
    before = dict(TASKS)
    with pytest.raises(ValueError, match=message):
        make()
    assert before == TASKS  # a refused registration leaves the registry as it was


def test_committed_experiment_records_read_back_with_their_task_unchanged():
    records = sorted((Path(__file__).parents[1] / "experiments" / "results").rglob("*experiment.json"))
    assert {json.loads(path.read_text())["task_name"] for path in records} == {"rule110", "depo", "arith", "text"}
    for path in records:
        record = json.loads(path.read_text())
        again = experiment_from_json(record).to_json()
        assert (again["task_name"], again["task"]) == (record["task_name"], record["task"]), path
