"""Task generators against brute-force checks written independently (string rewriting, walking the edge list,
evaluating the statements), plus layout, distributions, determinism and train/eval disjointness."""

from __future__ import annotations

import collections

import numpy as np
import pytest

from sleeplm.data import ArithConfig, DepoConfig, Rule110Config, batched, make_source

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


def test_depo_answers_match_walking_the_cycle():
    config = DepoConfig(max_nodes=12, min_nodes=5, name_tokens=6, window=16, max_hops=16, queries=10)
    source = make_source(config, "train", seed=2, size=300)
    hop_counts = collections.Counter()
    for index in range(300):
        example = source[index]
        text = text_of(example, source.vocab)
        assert len(example["inputs"]) == config.sequence_length
        edge_text = [t for t in text[: config.edge_block_length] if t != "<pad>"]
        assert all(t == "<pad>" for t in text[: config.edge_block_length - len(edge_text)])
        step = 2 * config.name_length
        edges = {tuple(edge_text[i : i + 2]): tuple(edge_text[i + 2 : i + 4]) for i in range(0, len(edge_text), step)}
        assert config.min_nodes <= len(edges) <= config.max_nodes
        node, seen = next(iter(edges)), set()  # a single cycle through every node
        while node not in seen:
            seen.add(node)
            node = edges[node]
        assert seen == set(edges)
        queries = text[config.edge_block_length :]
        expected_positions = []
        for q in range(config.queries):
            hop_token, *start, a1, a2, end = queries[q * 6 : (q + 1) * 6]
            hops = int(hop_token[len("<hop_") : -1])
            hop_counts[hops] += 1
            node = tuple(start)
            for _ in range(hops):
                node = edges[node]
            assert (a1, a2) == node and end == "<eoq>"
            answer_at = config.edge_block_length + q * 6 + 3
            expected_positions += [answer_at - 1, answer_at]
            assert example["hops"][answer_at - 1] == example["hops"][answer_at] == hops
        np.testing.assert_array_equal(label_positions(example), expected_positions)
        assert np.all(example["hops"][example["loss_mask"] == 0] == 0)
    assert set(hop_counts) == set(range(1, 17))
    expected = 3000 / 16
    assert all(abs(count - expected) < 5 * np.sqrt(expected) for count in hop_counts.values())


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
    config = ArithConfig(num_vars=40, modulus=7, min_ops=1, max_ops=6, windows=3, window=32)
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
    assert set(ops_counts) == set(range(1, 7))
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
        (lambda: make_source(Rule110Config(), "test"), r"split='test' is invalid"),
        (lambda: make_source(Rule110Config(), "train", 0, 10, held_out_fraction=1.5), r"held_out_fraction=1.5"),
        (lambda: make_source("rule110"), r"task config str is not one of"),
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
