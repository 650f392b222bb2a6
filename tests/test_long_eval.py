"""The long-context suite (`sleeplm.evaluation`): each generator against a hand-made example, the scorer against
RULER's rule, the streamed answers against a whole-sequence `forward`, and `sleeplm evaluate-long` end to end."""

from __future__ import annotations

import itertools
import json
import re

import jax
import numpy as np
import pytest
from conftest import save_random_weights, text_run_files, tiny_text_model

from sleeplm import forward, init_params
from sleeplm.cli.main import main as cli_main
from sleeplm.data.task import Codec
from sleeplm.evaluation.haystack import FILLER
from sleeplm.evaluation.runner import greedy_answers, summary
from sleeplm.evaluation.scoring import match_all, match_part
from sleeplm.evaluation.tasks import TASKS, make_example

CHARS = Codec(lambda text: [ord(c) for c in text], lambda ids: "".join(chr(i) for i in ids))  # one token a char
NIAH = (
    "Some special magic numbers are hidden within the following text. Make sure to memorize it. "
    "I will quiz you about the numbers afterwards.\n"
)


def text_of(example) -> str:
    return CHARS.decode(example.ids.tolist())


# ---------------------------------------------------------------------------------------------------- generators


def test_passkey_is_the_landmark_format_at_the_asked_depth():
    instruction = (
        "There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
        "I will quiz you about the important information there.\n"
    )
    question = "\nWhat is the pass key? The pass key is"
    probe = make_example("passkey", CHARS, 2000, 50, 0, seed=3)
    (key,) = probe.answers
    needle = f"\nThe pass key is {key}. Remember it. {key} is the pass key.\n"
    assert len(key) == 5 and key.isdigit()
    length = len(instruction) + len(needle) + len(question) + 4 * len(FILLER)  # exactly four filler sentences
    for depth, before in ((0, 0), (50, 2), (100, 4)):
        example = make_example("passkey", CHARS, length, depth, 0, seed=3)
        expected = instruction + FILLER * before + needle + FILLER * (4 - before) + question
        assert text_of(example) == expected and example.length == len(example.ids) == length
        assert example.needles[0].position == len(instruction) + before * len(FILLER)
        assert example.needles[0].depth == 25 * before and example.answers == (key,)
    assert make_example("passkey", CHARS, length, 50, 1, seed=3).answers != (key,)  # another sample, another key
    assert make_example("passkey", CHARS, length, 50, 0, seed=3).answers == (key,)  # deterministic


def test_niah_single_hides_one_magic_number_in_noise():
    example = make_example("niah_single", CHARS, 1500, 0, 0, seed=0)
    (value,) = example.answers
    key = example.needles[0].text.split(" for ")[1].split(" is: ")[0]
    needle = f"One of the special magic numbers for {key} is: {value}. "
    question = (
        f"\nWhat is the special magic number for {key} mentioned in the provided text? "
        f"The special magic number for {key} mentioned in the provided text is"
    )
    filler = 1500 - len(NIAH) - len(needle) - len(question)
    expected = NIAH + needle + (FILLER * 20)[:filler] + question  # depth 0: right after the instruction
    assert text_of(example) == expected and len(value) == 7 and value.isdigit()
    assert example.needles[0].position == len(NIAH) and example.needles[0].depth == 0


def test_niah_multikey_asks_one_key_among_distractors():
    example = make_example("niah_multikey", CHARS, 3000, 100, 0, seed=0)
    keys = [n.text.split(" for ")[1].split(" is: ")[0] for n in example.needles]
    values = [n.text.split(" is: ")[1].rstrip(". ") for n in example.needles]
    assert len(set(keys)) == 4 and example.answers == (values[0],)
    text = text_of(example)
    assert text.endswith(f"The special magic number for {keys[0]} mentioned in the provided text is")
    assert all(other not in text[-200:] for other in keys[1:])
    first = example.needles[0]
    assert text[first.position :].startswith(first.text) and first.depth == 100
    assert text[first.position + len(first.text) :].startswith("\nWhat is the special magic number")


def test_niah_multivalue_wants_every_value_of_one_key():
    example = make_example("niah_multivalue", CHARS, 3000, 25, 0, seed=0)
    (key,) = {n.text.split(" for ")[1].split(" is: ")[0] for n in example.needles}
    text = text_of(example)
    assert example.answers == tuple(n.text.split(" is: ")[1].rstrip(". ") for n in example.needles)
    assert len(set(example.answers)) == 4
    assert text.endswith(f"The special magic numbers for {key} mentioned in the provided text are")
    positions = [n.position for n in example.needles]  # one after another at the same depth
    assert [b - a for a, b in itertools.pairwise(positions)] == [len(n.text) for n in example.needles[:3]]
    assert all(text[n.position :].startswith(n.text) for n in example.needles)


def test_niah_multiquery_asks_every_key():
    example = make_example("niah_multiquery", CHARS, 3000, 75, 0, seed=0)
    keys = [n.text.split(" for ")[1].split(" is: ")[0] for n in example.needles]
    query = f"{keys[0]}, {keys[1]}, {keys[2]}, and {keys[3]}"
    assert text_of(example).endswith(f"The special magic numbers for {query} mentioned in the provided text are")
    assert example.answers == tuple(n.text.split(" is: ")[1].rstrip(". ") for n in example.needles)


def test_vt_chains_variables_from_the_depth_to_the_end():
    example = make_example("vt", CHARS, 4000, 20, 0, seed=0)
    names = example.answers
    value = example.needles[0].text.split(" = ")[1].rstrip(". ")
    expected = [f"VAR {names[0]} = {value}. "] + [f"VAR {b} = VAR {a}. " for a, b in itertools.pairwise(names)]
    assert [n.text for n in example.needles] == expected
    assert len(names) == 5 and all(len(n) == 5 and n.isupper() for n in names)
    text = text_of(example)
    assert all(text[n.position :].startswith(n.text) for n in example.needles)
    assert abs(example.needles[0].depth - 20) < 3 and example.needles[-1].depth == 100
    assert text.endswith(f"{len(names)} variables are assigned the value {value}, they are:")


def test_a_million_tokens_and_too_short_a_length():
    example = make_example("niah_single", CHARS, 1 << 20, 50, 0, seed=0)
    assert len(example.ids) == 1 << 20 and abs(example.needles[0].position / (1 << 20) - 0.5) < 0.001
    with pytest.raises(ValueError, match=r"task passkey: length 100 is too short: the prompt without filler"):
        make_example("passkey", CHARS, 100, 0, 0, seed=0)
    with pytest.raises(ValueError, match=r"task 'x' is unknown: choose from passkey, niah_single"):
        make_example("x", CHARS, 1000, 0, 0, seed=0)


# ---------------------------------------------------------------------------------------------------- scoring


def ruler_string_match(predictions, references, part: bool) -> float:
    """RULER's string_match_all / string_match_part, from their definition (percent over examples)."""
    per = [[float(r.lower() in p.lower()) for r in ref] for p, ref in zip(predictions, references, strict=True)]
    return 100 * sum(max(s) if part else sum(s) / len(s) for s in per) / len(per)


def test_the_scorer_follows_rulers_rule():
    outputs = ["The numbers are 123 and 456.", "ABCDE, fghij", "nothing here", "1234567 twice 1234567", ""]
    answers = [("123", "456", "789"), ("abcde", "FGHIJ", "KLMNO"), ("42",), ("1234567",), ("9",)]
    assert [match_all(o, a) for o, a in zip(outputs, answers, strict=True)] == [2 / 3, 2 / 3, 0, 1, 0]
    assert [match_part(o, a) for o, a in zip(outputs, answers, strict=True)] == [1, 1, 0, 1, 0]
    for part, score in ((False, match_all), (True, match_part)):
        ours = 100 * np.mean([score(o, a) for o, a in zip(outputs, answers, strict=True)])
        assert ours == pytest.approx(ruler_string_match(outputs, answers, part))
    assert {task.metric for task in TASKS.values()} == {"all"}  # RULER: string_match_all for niah_* and vt
    records = [{"task": "vt", "length": 8, "depth": 0.0, "score": s} for s in (1.0, 0.5)]
    records += [{"task": "vt", "length": 8, "depth": 50.0, "score": 0.0}]
    assert summary(records) == [
        {"task": "vt", "length": 8, "depth": 0.0, "examples": 2, "accuracy": 0.75},
        {"task": "vt", "length": 8, "depth": 50.0, "examples": 1, "accuracy": 0.0},
    ]


# ---------------------------------------------------------------------------------------------------- a tiny run

TINY = tiny_text_model(16)


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory):
    """A text run's files (its experiment, a BPE of 270 tokens, no checkpoint yet): the CLI's checks need no more."""
    texts = [FILLER * 4, NIAH, "What is the pass key? The pass key is 12345. Remember it."]
    return text_run_files(tmp_path_factory.mktemp("long") / "run", TINY, texts)


@pytest.fixture(scope="module")
def tiny_run(tiny_files):
    """The run with a random two-block model saved at step 0, made without training."""
    return save_random_weights(tiny_files)


@pytest.mark.slow
def test_streamed_answers_are_the_argmax_chain_of_forward(tiny_run):
    """Prompts fed in blocks of windows, then `generate`, answer what a whole-sequence `forward` predicts token by
    token (the shapes are those of the CLI test below, which then reuses the compiled functions)."""
    experiment = tiny_run.experiment()
    config, codec = experiment.config, tiny_run.codec(experiment)
    params, _ = tiny_run.restore_params(experiment)
    prompts = np.stack([make_example("passkey", codec, 512, d, 0, seed=0).ids for d in (0.0, 100.0)])
    answers = greedy_answers(params, config, prompts, 16)
    sequence = np.concatenate([prompts, answers], axis=1)[:, :-1]
    logits = np.asarray(forward(params, jax.numpy.asarray(sequence), config))
    np.testing.assert_array_equal(logits[:, 511:].argmax(-1), answers)
    assert len(np.unique(answers)) > 1  # not one token repeated: the chain is a real check


@pytest.mark.slow
@pytest.mark.parametrize("eviction", ["hard", "sliding", "none"])
def test_blocks_of_windows_answer_as_forward_in_every_eviction_mode(eviction):
    """Prompts of 5.5 windows fed in blocks of 2 windows (two blocks, then `generate` with the rest), short enough
    that every block still shows in a random model's answers; without eviction the stream is made with room for
    the prompt and the answer."""
    from sleeplm import Config, ModelConfig, SleepConfig

    model = ModelConfig(vocab_size=32, d_model=16, num_heads=2, mlp_dim=32, layers=("attn", "gdn"))
    config = Config(model, SleepConfig(window=8, passes=2, eviction=eviction))
    params = init_params(jax.random.key(1), config)
    prompts = np.random.default_rng(0).integers(0, 32, (3, 44))
    answers = greedy_answers(params, config, prompts, 6, block_windows=2)
    sequence = np.concatenate([prompts, answers], axis=1)[:, :-1]
    logits = np.asarray(forward(params, jax.numpy.asarray(sequence), config))
    np.testing.assert_array_equal(logits[:, 43:].argmax(-1), answers)
    assert len(np.unique(answers)) > 1


@pytest.mark.slow
def test_cli_writes_results_and_heatmaps(tiny_run, tmp_path, capsys):
    out = tmp_path / "suite"
    argv = ["evaluate-long", "--workdir", str(tiny_run.path), "--tasks", "passkey", "--lengths", "512,1024"]
    cli_main([*argv, "--depths", "0,100", "--samples", "1", "--out", str(out)])
    results = json.loads((out / "results.json").read_text())
    assert results["step"] == 0 and results["tasks"] == {"passkey": {"metric": "all", "max_new_tokens": 16}}
    assert [(c["length"], c["depth"], c["examples"]) for c in results["summary"]] == [
        (512, 0.0, 1), (512, 100.0, 1), (1024, 0.0, 1), (1024, 100.0, 1),
    ]  # fmt: skip
    record = results["records"][0]
    assert record["needles"][0]["text"].startswith("\nThe pass key is") and len(record["answers"]) == 1
    assert isinstance(record["output"], str) and record["score"] in (0.0, 1.0)
    assert (out / "heatmap_passkey.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "passkey" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--tasks", "x,vt"], rf"argument --tasks: 'x,vt' is invalid: allowed are {', '.join(TASKS)}, comma-sep"),
        (["--step", "-2"], r"argument --step: '-2' is invalid: must be an integer >= 0"),
        (["--tasks", "vt,vt"], r"argument --tasks: 'vt,vt' repeats a value"),
        (["--lengths", "2k"], r"argument --lengths: '2k' is invalid: allowed are token counts"),
        (["--lengths", "2000000"], r"argument --lengths: '2000000' is invalid: .* to 1048576"),
        (["--depths", "0,101"], r"argument --depths: '0,101' is invalid: allowed are needle depths in percent"),
        (["--samples", "0"], r"argument --samples: '0' is invalid: must be an integer >= 1"),
        (["--seed", "-1"], r"argument --seed: '-1' is invalid: must be an integer >= 0"),
        (["--block-windows", "0"], r"argument --block-windows: '0' is invalid"),
        (["--batch-size", "x"], r"argument --batch-size: 'x' is invalid"),
        (["--lengths", "8"], r"--lengths 8 is invalid: a length is at least one window \(16 tokens\)"),
        (["--lengths", "64,512"], r"--lengths 64 is too short for the prompts: task passkey: length 64 is too short"),
        (["--out", "FILE"], r"--out .*file is a file: give a directory"),
    ],
)
def test_bad_cli_values_fail_naming_the_flag(tiny_files, tmp_path, capsys, flags, message):
    (tmp_path / "file").write_text("")
    given = {"--tasks": "passkey", "--lengths": "512", "--out": str(tmp_path / "out")}
    for flag, value in zip(flags[::2], flags[1::2], strict=True):
        given[flag] = str(tmp_path / "file") if value == "FILE" else value
    argv = ["evaluate-long", "--workdir", str(tiny_files.path), *[x for pair in given.items() for x in pair]]
    with pytest.raises(SystemExit) as exit_info:
        cli_main(argv)
    text = f"{exit_info.value.code}\n{capsys.readouterr().err}"
    assert re.search(message, text), text
    assert not (tmp_path / "out").exists()
