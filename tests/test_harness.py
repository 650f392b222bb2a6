"""The lm-evaluation-harness model "sleeplm" (`sleeplm.evaluation.harness`) on a tiny random-weight text run: rolling
log-likelihoods against `score`, multiple choice against a whole-sequence `forward`, generations against `generate`,
through lm-eval itself on local YAML tasks (nothing from a hub)."""

from __future__ import annotations

import functools
import json
from types import SimpleNamespace

import jax
import lm_eval
import numpy as np
import pytest
from conftest import save_random_weights, text_run_files, tiny_text_model
from lm_eval.api.instance import Instance

from sleeplm import forward, init_params
from sleeplm.data.common import Vocabulary
from sleeplm.data.task import vocabulary_codec
from sleeplm.data.tokenizer import train_tokenizer
from sleeplm.evaluation.harness import SleepLM, cut, encode_pair, main
from sleeplm.experiment.workdir import Workdir
from sleeplm.inference.generate import generate
from sleeplm.inference.score import score
from sleeplm.inference.streams import start_stream
from sleeplm.training.presets import build_experiment

TINY = tiny_text_model(8)
TEXTS = [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "def main():\n    return sum(range(10))\n",
    "A window is slept on before its keys and values are evicted. ",
]
LONG = "The fast weights keep what the evicted windows held, or some of it. " * 4  # over 8 windows of 8 tokens
BLOCK_WINDOWS = 2  # a long request takes several blocks


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory):
    """A text run's experiment (window 8) and BPE of 270 tokens, no checkpoint yet."""
    return text_run_files(tmp_path_factory.mktemp("harness") / "run", TINY, TEXTS)


@pytest.fixture(scope="module")
def tiny_run(tiny_files):
    """The run with a random two-block model saved at step 0, made without training."""
    return save_random_weights(tiny_files)


@pytest.fixture(scope="module")
def model(tiny_run):
    return SleepLM(workdir=str(tiny_run.path), batch_size=3, block_windows=BLOCK_WINDOWS)


def total_log_likelihood(model: SleepLM, ids: list[int]) -> float:
    """`score`'s total over the same tokens (every token after the first), with another block size."""
    result = score(model.params, np.asarray([ids]), model.config, block_windows=1)
    return -result.mean_nll * result.tokens


def forward_log_likelihoods(model: SleepLM, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
    """Each continuation's log-likelihood and greediness from one whole-sequence `forward` over all the pairs,
    right-padded to one length (padding after a sequence changes none of its logits)."""
    ids = np.zeros((len(pairs), max(len(c) + len(x) for c, x in pairs)), np.int32)
    for i, (context, continuation) in enumerate(pairs):
        ids[i, : len(context) + len(continuation)] = context + continuation
    logits = np.asarray(forward(model.params, jax.numpy.asarray(ids), model.config), np.float64)
    log_probs = logits - logits.max(-1, keepdims=True)
    log_probs -= np.log(np.exp(log_probs).sum(-1, keepdims=True))
    results = []
    for i, (context, continuation) in enumerate(pairs):
        positions = np.arange(len(context) - 1, len(context) + len(continuation) - 1)
        hits = log_probs[i, positions, continuation], logits[i, positions].argmax(-1) == continuation
        results.append((float(hits[0].sum()), bool(hits[1].all())))
    return results


def requests(kind: str, arguments: list[tuple]) -> list[Instance]:
    return [Instance(kind, {}, args, i) for i, args in enumerate(arguments)]


# ------------------------------------------------------------------------------------------------ the model alone


@pytest.mark.slow
def test_rolling_log_likelihoods_are_scores_totals(model):
    """Documents of one token past a window to over eight windows, batched with a padding row, equal `score`."""
    documents = [TEXTS[0], LONG, TEXTS[1], TEXTS[2][:20]]
    got = model.loglikelihood_rolling(requests("loglikelihood_rolling", [(d,) for d in documents]))
    expected = [total_log_likelihood(model, model.codec.encode(d)) for d in documents]
    assert len(model.codec.encode(LONG)) > 8 * 8
    np.testing.assert_allclose(got, expected, rtol=2e-5)


def test_context_and_continuation_are_split_where_the_codec_keeps_the_boundary(tiny_files):
    encode = tiny_files.codec().encode
    pair = functools.partial(encode_pair, tiny_files.codec(), [])
    context, continuation = pair("The quick brown ", "fox")  # the trailing space moves on
    assert context == encode("The quick brown") and context + continuation == encode("The quick brown fox")
    context, continuation = pair("The quick brown f", "ox")  # the merge "fo" spans the boundary
    assert encode("The quick brown f") != encode("The quick brown fox")[: len(context)]
    assert (context, continuation) == (encode("The quick brown f"), encode("ox"))
    assert pair("", " fox") == (encode(" fox")[:1], encode(" fox")[1:])
    assert encode_pair(tiny_files.codec(), [1], "", " fox") == ([1], encode(" fox"))
    words = vocabulary_codec(SimpleNamespace(vocab=Vocabulary(("a", "b", "c", "bc"))), None)
    assert encode_pair(words, [], "a b", " c") == ([0, 1], [2])
    assert encode_pair(words, [], "a b", "c") == ([0, 1], [2])  # separate: "a bc" would read "bc"
    assert encode_pair(words, [], "a b", "a") == ([0, 1], [0])  # separate: "ba" is no word
    assert cut("abc\n\ndef", ["\n\n", "c"]) == "ab" and cut("abc", []) == "abc"


@pytest.mark.slow
@pytest.mark.parametrize("eviction", ["sliding", "none"])
def test_rolling_log_likelihoods_in_other_eviction_modes_are_forwards(tmp_path, eviction):
    """Under sliding eviction and without eviction (a stream with room for the batch's longest document), rolling
    log-likelihoods equal a whole-sequence `forward`'s."""
    run = Workdir(tmp_path / "run")
    experiment = build_experiment("lm-cpu", TINY | {"sleep.eviction": eviction})
    run.write_experiment(experiment)
    train_tokenizer(TEXTS, 270, run.tokenizer_path)
    run.checkpoints().save_weights(init_params(jax.random.key(0), experiment.config), experiment)
    model = SleepLM(workdir=str(run.path), batch_size=2, block_windows=BLOCK_WINDOWS)
    documents = [TEXTS[0], LONG, TEXTS[2]]
    got = model.loglikelihood_rolling(requests("loglikelihood_rolling", [(d,) for d in documents]))
    ids = [model.codec.encode(d) for d in documents]
    expected = [e[0] for e in forward_log_likelihoods(model, [(i[:1], i[1:]) for i in ids])]
    np.testing.assert_allclose(got, expected, rtol=2e-5)


# ------------------------------------------------------------------------------------------------ through lm-eval


def write_tasks(directory, last: tuple[str, str] = ("def main():", " return")) -> dict:
    """Three local tasks (multiple choice, rolling, generate_until) reading .jsonl files written beside them;
    `last`: the last question and one of its choices (the model's greedy continuation, where a test finds one)."""
    docs = {
        "mc": [
            {"question": "The quick brown fox", "choices": [" jumps", " sleeps", " runs away"], "answer": 0},
            {"question": LONG + "What do fast weights keep?", "choices": [" windows", " nothing"], "answer": 1},
            {"question": last[0], "choices": [" return", " pass", last[1], " sum"], "answer": 2},
        ],
        "rolling": [{"text": t} for t in (*TEXTS, LONG)],
        "gen": [{"prompt": p, "answer": "x"} for p in ("The quick", LONG, "def main():", "A window")],
    }
    common = "test_split: test\nmetadata:\n  version: 1\n"
    specs = {
        "mc": "output_type: multiple_choice\ndoc_to_text: question\ndoc_to_target: answer\ndoc_to_choice: choices\n"
        "target_delimiter: ''\nmetric_list:\n  - metric: acc\n",
        "rolling": "output_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: text\n"
        "metric_list:\n  - metric: word_perplexity\n",
        "gen": "output_type: generate_until\ndoc_to_text: prompt\ndoc_to_target: answer\n"
        "generation_kwargs:\n  until: ['e ', 'x']\n  max_gen_toks: 12\nmetric_list:\n  - metric: exact_match\n",
    }
    for name, rows in docs.items():
        (directory / f"{name}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
        files = {"test": str(directory / f"{name}.jsonl")}
        dataset = {"data_files": files, "cache_dir": str(directory / "hf_cache")}
        head = f"task: sleeplm_{name}\ndataset_path: json\ndataset_kwargs: {json.dumps(dataset)}\n"
        (directory / f"{name}.yaml").write_text(head + common + specs[name])
    return docs


def greedy_question(model: SleepLM) -> tuple[str, str]:
    """A prefix of a text and the model's greedy next token as text, one that encodes back to that token after the
    prefix (a random model's argmax is often a byte that is no character alone)."""
    encode, decode = model.codec.encode, model.codec.decode
    questions = [TEXTS[0][:k] for k in range(3, 45)]
    stream = start_stream(model.config, len(questions), jax.random.key(0))
    tokens = generate(model.params, stream, [encode(q) for q in questions], model.config, max_new_tokens=1).tokens
    for question, token in zip(questions, tokens[:, 0].tolist(), strict=True):
        if encode(question + decode([token])) == [*encode(question), token]:
            return question, decode([token])
    raise AssertionError("no prefix's greedy token is a character")


@pytest.fixture(scope="module")
def evaluated(tiny_run, model, tmp_path_factory):
    """lm-eval's samples of the three tasks, run on the tiny model by `simple_evaluate`, offline."""
    directory = tmp_path_factory.mktemp("tasks")
    docs = write_tasks(directory, greedy_question(model))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_DATASETS_OFFLINE", "1")
        patch.setenv("HF_HUB_OFFLINE", "1")
        results = lm_eval.simple_evaluate(
            model="sleeplm",
            model_args=f"workdir={tiny_run.path},batch_size=2,block_windows={BLOCK_WINDOWS}",
            tasks=["sleeplm_mc", "sleeplm_rolling", "sleeplm_gen"],
            task_manager=lm_eval.tasks.TaskManager(include_path=str(directory), include_defaults=False),
            log_samples=True,
        )
    samples = {name: sorted(results["samples"][f"sleeplm_{name}"], key=lambda s: s["doc_id"]) for name in docs}
    return docs, samples, results


@pytest.mark.slow
def test_lm_eval_rolling_equals_score(evaluated, model):
    docs, samples, results = evaluated
    got = [sample["resps"][0][0] for sample in samples["rolling"]]
    expected = [total_log_likelihood(model, model.codec.encode(doc["text"])) for doc in docs["rolling"]]
    np.testing.assert_allclose(got, expected, rtol=2e-5)
    assert np.isfinite(results["results"]["sleeplm_rolling"]["word_perplexity,none"])


@pytest.mark.slow
def test_lm_eval_multiple_choice_ranks_as_forward(evaluated, model):
    """Each choice's (log-likelihood, is_greedy) equals a whole-sequence `forward`'s to float32 round-off, so the
    choices rank the same; the second question's context spans eight windows."""
    docs, samples, _ = evaluated
    pairs = []
    for doc in docs["mc"]:
        context = model.codec.encode(doc["question"])
        for choice in doc["choices"]:
            whole = model.codec.encode(doc["question"] + choice)
            assert whole[: len(context)] == context
            pairs.append((context, whole[len(context) :]))
    expected = forward_log_likelihoods(model, pairs)
    got = [tuple(resp[0]) for sample in samples["mc"] for resp in sample["resps"]]
    np.testing.assert_allclose([g[0] for g in got], [e[0] for e in expected], rtol=1e-5, atol=1e-5)
    assert [g[1] for g in got] == [e[1] for e in expected]
    first = 0
    for doc in docs["mc"]:
        choices = slice(first, first + len(doc["choices"]))
        assert np.argmax([g[0] for g in got[choices]]) == np.argmax([e[0] for e in expected[choices]])
        first += len(doc["choices"])
    assert got[-2][1] and expected[-2][1]  # the model's greedy continuation is a choice
    assert len(model.codec.encode(docs["mc"][1]["question"])) > 8 * 8


@pytest.mark.slow
def test_lm_eval_generations_are_generates_cut_at_the_stop_strings(evaluated, model):
    docs, samples, _ = evaluated
    prompts = [model.codec.encode(doc["prompt"]) for doc in docs["gen"]]
    stream = start_stream(model.config, len(prompts), jax.random.key(0))
    tokens = generate(model.params, stream, prompts, model.config, max_new_tokens=12).tokens
    full = [model.codec.decode([int(t) for t in row]) for row in tokens]
    expected = [cut(text, ["e ", "x"]) for text in full]
    assert [sample["resps"][0][0] for sample in samples["gen"]] == expected
    assert any(e != f for e, f in zip(expected, full, strict=True))  # a stop string cut at least one


@pytest.mark.slow
def test_the_entry_point_runs_lm_eval_with_the_model_registered(tiny_run, tmp_path, monkeypatch):
    write_tasks(tmp_path)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    argv = ["--model_args", f"workdir={tiny_run.path},batch_size=2,block_windows={BLOCK_WINDOWS}", "--tasks"]
    main([*argv, "sleeplm_rolling", "--include_path", str(tmp_path), "--output_path", str(tmp_path / "out")])
    (written,) = tmp_path.glob("out/**/results_*.json")
    results = json.loads(written.read_text())
    assert results["config"]["model"] == "sleeplm" and "sleeplm_rolling" in results["results"]
    assert (results["config"]["workdir"], results["config"]["step"]) == (str(tiny_run.path), 0)
