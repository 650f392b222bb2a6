"""Generation and saved streams: greedy decoding against the argmax of `forward` over the generated sequence
(teacher forced), ragged rows against each row alone, sampling's determinism and support, save / restore against
uninterrupted generation, stop tokens and bad input."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_sleep import MODEL, PASSES_AND_MODES, WINDOW, make_config, perturbed

from sleeplm import forward, init_params
from sleeplm.experiment.workdir import CheckpointError
from sleeplm.inference.generate import NO_TOKEN, Sampling, generate
from sleeplm.inference.streams import restore_stream, save_stream, start_stream

# Prompts shorter than, as long as, and longer than a window (2L + 5); 15 new tokens cross two or three windows.
PROMPT_LENGTHS = (3, WINDOW, 2 * WINDOW + 5)
NEW = 15


def model(passes, eviction, seed=41):
    config = make_config(passes, eviction)
    return config, perturbed(init_params(jax.random.key(seed), config), jax.random.key(seed + 1))


def prompts_for(lengths, seed=43):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, MODEL.vocab_size, n) for n in lengths]


def run(params, config, prompts, key=0, **kwargs):
    stream = start_stream(config, len(prompts), key if not isinstance(key, int) else jax.random.key(key))
    return generate(params, stream, prompts, config, max_new_tokens=kwargs.pop("max_new_tokens", NEW), **kwargs)


@pytest.mark.parametrize(("passes", "eviction"), PASSES_AND_MODES)
def test_greedy_generation_is_the_argmax_of_forward_over_what_it_generated(passes, eviction):
    config, params = model(passes, eviction)
    prompts = prompts_for(PROMPT_LENGTHS)
    generated = run(params, config, prompts)
    assert generated.tokens.shape == (3, NEW) and list(generated.lengths) == [NEW] * 3
    for prompt, new in zip(prompts, generated.tokens, strict=True):
        sequence = np.concatenate([prompt, new])
        logits = forward(params, jnp.asarray(sequence[None, :-1]), config)[0]
        np.testing.assert_array_equal(np.argmax(logits, -1)[len(prompt) - 1 :], new)


def test_rows_of_a_ragged_batch_sample_what_they_sample_alone_and_never_influence_each_other():
    config, params = model(3, "sliding")
    sampling = Sampling(temperature=1.0, top_k=5)
    prompts = prompts_for(PROMPT_LENGTHS)
    key = jax.random.key(7)
    batch = run(params, config, prompts, key, sampling=sampling)
    for row, prompt in enumerate(prompts):
        alone = run(params, config, [prompt], jax.random.fold_in(key, row)[None], sampling=sampling)
        np.testing.assert_array_equal(alone.tokens[0], batch.tokens[row])
    changed = [prompts[0], prompts_for([9], seed=44)[0], prompts[2]]
    other = run(params, config, changed, key, sampling=sampling)
    np.testing.assert_array_equal(other.tokens[[0, 2]], batch.tokens[[0, 2]])
    assert not np.array_equal(other.tokens[1], batch.tokens[1])


def test_sampling_is_deterministic_in_the_key_and_stays_in_the_top_k():
    config, params = model(2, "hard")
    prompts = prompts_for((4, 9))
    sampling = Sampling(temperature=1.5, top_k=3)
    first, again = (run(params, config, prompts, 5, sampling=sampling) for _ in range(2))
    np.testing.assert_array_equal(first.tokens, again.tokens)
    assert not np.array_equal(run(params, config, prompts, 6, sampling=sampling).tokens, first.tokens)
    for prompt, new in zip(prompts, first.tokens, strict=True):
        logits = np.asarray(forward(params, jnp.asarray(np.concatenate([prompt, new])[None, :-1]), config)[0])
        top3 = np.argsort(-logits, -1)[len(prompt) - 1 :, :3]
        assert all(token in allowed for token, allowed in zip(new, top3, strict=True))
    greedy = run(params, config, prompts)
    for narrow in (
        Sampling(temperature=0.0),
        Sampling(temperature=1.0, top_k=1),
        Sampling(temperature=1.0, top_p=1e-6),
    ):
        np.testing.assert_array_equal(run(params, config, prompts, 9, sampling=narrow).tokens, greedy.tokens)


@pytest.mark.parametrize("sleep", ["on_full", "deferred"])
def test_a_saved_and_restored_stream_continues_exactly_like_an_uninterrupted_one(tmp_path, sleep):
    config, params = model(3, "hard")
    prompts = prompts_for((5, 2 * WINDOW))
    sampling = Sampling(temperature=1.0)
    whole = run(params, config, prompts, 3, sampling=sampling, max_new_tokens=2 * NEW, sleep=sleep)
    half = run(params, config, prompts, 3, sampling=sampling, max_new_tokens=NEW, sleep=sleep)
    save_stream(tmp_path / "stream", half.stream, config)
    restored = restore_stream(tmp_path / "stream", config)
    rest = generate(params, restored, [[], []], config, max_new_tokens=NEW, sampling=sampling, sleep=sleep)
    np.testing.assert_array_equal(np.concatenate([half.tokens, rest.tokens], axis=1), whole.tokens)
    for a, b in zip(jax.tree.leaves(rest.stream), jax.tree.leaves(whole.stream), strict=True):
        np.testing.assert_array_equal(a, b)


def test_a_window_the_last_token_fills_is_slept_on_now_or_at_the_next_token():
    config, params = model(3, "hard")
    prompts = prompts_for((WINDOW - 4,))  # 4 new tokens fill the window exactly
    now, later = (run(params, config, prompts, max_new_tokens=4, sleep=sleep) for sleep in ("on_full", "deferred"))
    np.testing.assert_array_equal(now.tokens, later.tokens)
    assert int(now.stream.state.pos[0]) == 0 and int(later.stream.state.pos[0]) == WINDOW
    now, later = (
        generate(params, g.stream, [[]], config, max_new_tokens=5, sleep=sleep)
        for g, sleep in ((now, "on_full"), (later, "deferred"))
    )
    np.testing.assert_array_equal(now.tokens, later.tokens)
    for a, b in zip(jax.tree.leaves(now.stream), jax.tree.leaves(later.stream), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_bad_restores_fail_clearly(tmp_path):
    config, params = model(2, "hard")
    saved = save_stream(tmp_path / "stream", run(params, config, prompts_for((4,)), max_new_tokens=2).stream, config)
    with pytest.raises(CheckpointError, match=r"saved for another config: config.sleep.passes: saved 2, now 3"):
        restore_stream(saved, make_config(3, "hard"))
    with pytest.raises(CheckpointError, match=r"config.model.d_model: saved 32, now 16"):
        restore_stream(saved, make_config(2, "hard", d_model=16, mlp_dim=32))
    with pytest.raises(CheckpointError, match=r"stream.json does not exist"):
        restore_stream(tmp_path / "nowhere", config)
    with pytest.raises(FileExistsError, match=r"save a stream to a new directory"):
        save_stream(saved, run(params, config, prompts_for((4,)), max_new_tokens=1).stream, config)
    for path in (saved / "arrays").rglob("*"):
        if path.is_file() and path.stat().st_size > 64:
            path.write_bytes(b"not an array")
    with pytest.raises(CheckpointError, match=r"stream .* is corrupted"):
        restore_stream(saved, config)


def test_a_row_stops_at_a_stop_token_and_the_others_go_on():
    config, params = model(2, "sliding")
    prompts = prompts_for((4, 7))
    free = run(params, config, prompts)
    stop = int(free.tokens[0, 2])  # row 0 stops at its third token (or earlier, if it occurs before)
    stopped = run(params, config, prompts, stop_tokens=[stop])
    first = int(np.flatnonzero(free.tokens[0] == stop)[0])
    assert stopped.lengths[0] == first + 1 and np.all(stopped.tokens[0, first + 1 :] == NO_TOKEN)
    np.testing.assert_array_equal(stopped.tokens[0, : first + 1], free.tokens[0, : first + 1])
    if stop not in free.tokens[1]:
        np.testing.assert_array_equal(stopped.tokens[1], free.tokens[1])


def test_bad_generation_inputs_fail_clearly():
    config, params = model(2, "hard")
    stream = lambda batch=1: start_stream(config, batch, jax.random.key(0))
    cases = [
        (
            dict(prompts=[[1, MODEL.vocab_size]]),
            r"prompt 0 has token id 13 outside the vocabulary: ids must be in \[0, 13\)",
        ),
        (dict(prompts=[[-2, 1]]), r"prompt 0 has token id -2 outside the vocabulary"),
        (dict(prompts=[[]]), r"prompt 0 is empty and its stream has no tokens yet"),
        (dict(prompts=[[1]], max_new_tokens=0), r"max_new_tokens=0 is invalid: must be a positive integer"),
        (dict(prompts=[[1], [2]]), r"got 2 prompts for a stream of 1 rows"),
        (dict(prompts=[[1]], stop_tokens=[99]), r"stop token 99 is outside the vocabulary"),
        (dict(prompts=[[1]], sleep="later"), r"sleep='later' is invalid: choose one of \('on_full', 'deferred'\)"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            generate(params, stream(), kwargs.pop("prompts"), config, **({"max_new_tokens": 2} | kwargs))
    for bad, message in (
        (dict(top_p=0.0), r"top_p=0.0 is invalid: must be in \(0, 1\]"),
        (dict(top_p=1.5), r"top_p=1.5 is invalid"),
        (dict(temperature=-1.0), r"temperature=-1.0 is invalid"),
        (dict(top_k=0), r"top_k=0 is invalid"),
    ):
        with pytest.raises(ValueError, match=message):
            Sampling(**bad)
    none = make_config(2, "none")
    full = start_stream(none, 1, jax.random.key(0), capacity=2 * WINDOW)
    with pytest.raises(ValueError, match=r"prompt 0 needs 19 tokens of the stream's capacity 12"):
        generate(params, full, [list(range(9))], none, max_new_tokens=10)
    with pytest.raises(ValueError, match=r"key uses the PRNG rbg: streams take the default one, threefry2x32"):
        start_stream(config, 1, jax.random.key(0, impl="rbg"))
