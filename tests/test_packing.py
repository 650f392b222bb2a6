"""Packed rows (documents one after another, each from a window start, padding after a document's last token) give
every document exactly what it gets alone: per-token losses against running each document by itself."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from test_sleep import MODEL, PASSES_AND_MODES, WINDOW, make_config, perturbed

from sleeplm import forward, init_params

# Input lengths (tokens - 1) of the documents of two rows of 6 windows: shorter than, equal to, longer than a window.
ROWS = [[3, WINDOW, 2 * WINDOW + 1], [WINDOW - 1, 2 * WINDOW, 1, WINDOW]]
ROW_WINDOWS = 6


def pack(documents: list[list[np.ndarray]]):
    """(inputs, targets, valid, document_start) for rows of ROW_WINDOWS windows, each document from a window start."""
    length = ROW_WINDOWS * WINDOW
    arrays = {
        name: np.zeros((len(documents), length), dtype)
        for name, dtype in (("inputs", np.int32), ("targets", np.int32), ("valid", bool), ("document_start", bool))
    }
    for row, docs in enumerate(documents):
        at = 0
        for doc in docs:
            n = len(doc) - 1
            arrays["inputs"][row, at : at + n] = doc[:-1]
            arrays["targets"][row, at : at + n] = doc[1:]
            arrays["valid"][row, at : at + n] = True
            arrays["document_start"][row, at] = True
            at += -(-n // WINDOW) * WINDOW
        assert at <= length
    return arrays


def token_losses(logits, targets):
    return optax.softmax_cross_entropy_with_integer_labels(logits, jnp.asarray(targets))


@pytest.mark.parametrize(("passes", "eviction"), [*PASSES_AND_MODES, (3, "none")])
def test_packed_rows_equal_each_document_alone(passes, eviction):
    config = make_config(passes, eviction)
    params = perturbed(init_params(jax.random.key(31), config), jax.random.key(32))
    rng = np.random.default_rng(33)
    documents = [[rng.integers(0, MODEL.vocab_size, n + 1) for n in row] for row in ROWS]
    packed = pack(documents)
    logits = forward(
        params, jnp.asarray(packed["inputs"]), config, valid=packed["valid"], document_start=packed["document_start"]
    )
    packed_losses = np.asarray(token_losses(logits, packed["targets"]))
    assert np.all(np.isfinite(packed_losses[packed["valid"]]))
    for row, docs in enumerate(documents):
        at = 0
        for doc in docs:
            n = len(doc) - 1
            alone = token_losses(forward(params, jnp.asarray(doc[None, :-1]), config), doc[None, 1:])[0]
            np.testing.assert_allclose(packed_losses[row, at : at + n], alone, rtol=1e-5, atol=1e-6)
            at += -(-n // WINDOW) * WINDOW


def test_without_resets_a_document_would_see_the_one_before():
    """The control: the same packed row with its document starts unmarked gives the later documents other losses
    (the test above would catch a reset that does nothing)."""
    config = make_config(3, "sliding")
    params = perturbed(init_params(jax.random.key(31), config), jax.random.key(32))
    rng = np.random.default_rng(33)
    packed = pack([[rng.integers(0, MODEL.vocab_size, n + 1) for n in ROWS[0]]])
    inputs, valid = jnp.asarray(packed["inputs"]), packed["valid"]
    with_resets = forward(params, inputs, config, valid=valid, document_start=packed["document_start"])
    without = forward(params, inputs, config, valid=valid)
    second = slice(WINDOW, 2 * WINDOW)
    assert np.max(np.abs(with_resets[:, second] - without[:, second])) > 1e-3
