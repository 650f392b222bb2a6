"""Scoring: per-token log-likelihoods against `forward` on the same sequences, whatever the block size or how the
input arrives; distance buckets against a hand bucketing; one compiled block function for every length; bad input."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from test_sleep import MODEL, WINDOW, make_config, perturbed

from sleeplm import forward, init_params
from sleeplm.inference.score import score, score_block


def forward_log_likelihoods(params, tokens, config) -> np.ndarray:
    logits = forward(params, jnp.asarray(tokens[:, :-1]), config)
    return -np.asarray(optax.softmax_cross_entropy_with_integer_labels(logits, jnp.asarray(tokens[:, 1:])))


@pytest.mark.parametrize(
    ("passes", "eviction"),
    [(3, "hard"), pytest.param(3, "sliding", marks=pytest.mark.slow), pytest.param(1, "hard", marks=pytest.mark.slow)],
)
def test_scores_equal_forward_whatever_the_blocks(passes, eviction):
    config = make_config(passes, eviction)
    params = perturbed(init_params(jax.random.key(51), config), jax.random.key(52))
    tokens = np.random.default_rng(53).integers(0, MODEL.vocab_size, (2, 5 * WINDOW + 4))
    expected = forward_log_likelihoods(params, tokens, config)
    pieces = (tokens[:, i : i + 7] for i in range(0, tokens.shape[1], 7))  # pieces that ignore window boundaries
    for source, block_windows in ((tokens, 2), (pieces, 1), (tokens, 8)):
        result = score(params, source, config, block_windows=block_windows, keep_token_log_likelihoods=True)
        assert result.token_log_likelihoods.shape == tokens.shape and np.all(
            np.isnan(result.token_log_likelihoods[:, 0])
        )
        np.testing.assert_allclose(result.token_log_likelihoods[:, 1:], expected, rtol=1e-5, atol=1e-5)
        assert result.tokens == expected.size
        np.testing.assert_allclose(result.mean_nll, -expected.mean(), rtol=1e-5)
    position = np.arange(1, tokens.shape[1])  # the predicted token's distance from the start
    edges = [(0, WINDOW), (WINDOW, 2 * WINDOW), (2 * WINDOW, 4 * WINDOW), (4 * WINDOW, 8 * WINDOW)]
    assert [(b["start"], b["end"]) for b in result.buckets] == edges
    for bucket, (start, end) in zip(result.buckets, edges, strict=True):
        inside = (position >= start) & (position < end)
        assert bucket["tokens"] == 2 * inside.sum()
        np.testing.assert_allclose(bucket["mean_nll"], -expected[:, inside].mean(), rtol=1e-5)


def test_every_length_runs_the_same_compiled_block():
    config = make_config(2, "hard")
    params = init_params(jax.random.key(0), config)
    rng = np.random.default_rng(0)
    score(params, rng.integers(0, MODEL.vocab_size, (1, 3 * WINDOW)), config, block_windows=2)
    compiled = score_block._cache_size()
    score(params, rng.integers(0, MODEL.vocab_size, (1, 40 * WINDOW + 5)), config, block_windows=2)
    assert score_block._cache_size() == compiled  # nothing in the device computation depends on the length


def test_bad_score_inputs_fail_clearly():
    config = make_config(2, "hard")
    params = init_params(jax.random.key(0), config)
    tokens = np.zeros((1, 10), np.int64)
    tokens[0, 4] = MODEL.vocab_size
    with pytest.raises(ValueError, match=r"token id 13 is outside the vocabulary: ids must be in \[0, 13\)"):
        score(params, tokens, config)
    with pytest.raises(ValueError, match=r"sequences are empty"):
        score(params, iter([]), config)
    with pytest.raises(ValueError, match=r"sleep.eviction='none' keeps every token"):
        score(params, tokens, make_config(2, "none"))
    with pytest.raises(ValueError, match=r"block_windows=0 is invalid"):
        score(params, tokens, config, block_windows=0)
    with pytest.raises(ValueError, match=r"integer token ids of shape \(batch, time\)"):
        score(params, iter([np.zeros(5, np.int32)]), config)
