"""Packed rows (documents one after another, each from a window start, padding after a document's last token) give
every document exactly what it gets alone: per-token losses against running each document by itself."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from test_sleep import MODEL, PASSES_AND_MODES, WINDOW, make_config, perturbed

import sleeplm.core.forward
from sleeplm import forward, init_params

# Input lengths (tokens - 1) of the documents of two rows: shorter than, equal to, longer than a window, and last a
# document that starts in the rows' trailing partial window (the row length is not a multiple of the window).
ROWS = [[3, WINDOW, 2 * WINDOW + 1, 2], [WINDOW - 1, 2 * WINDOW, 1, WINDOW, 3]]
ROW_LENGTH = 5 * WINDOW + 3


def pack(documents: list[list[np.ndarray]]):
    """(inputs, targets, valid, document_start) for rows of ROW_LENGTH tokens, each document from a window start."""
    length = ROW_LENGTH
    arrays = {
        name: np.zeros((len(documents), length), dtype)
        for name, dtype in (("inputs", np.int32), ("targets", np.int32), ("valid", bool), ("document_start", bool))
    }
    for row, docs in enumerate(documents):
        at = 0
        for doc in docs:
            n = len(doc) - 1
            assert at + n <= length
            arrays["inputs"][row, at : at + n] = doc[:-1]
            arrays["targets"][row, at : at + n] = doc[1:]
            arrays["valid"][row, at : at + n] = True
            arrays["document_start"][row, at] = True
            at += -(-n // WINDOW) * WINDOW
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


def test_without_resets_a_document_would_see_the_one_before(monkeypatch):
    """The control: the same packed row with the document-start reset disabled gives the later documents other
    losses (the test above would catch a reset that does nothing)."""
    config = make_config(3, "sliding")
    params = perturbed(init_params(jax.random.key(31), config), jax.random.key(32))
    rng = np.random.default_rng(33)
    packed = pack([[rng.integers(0, MODEL.vocab_size, n + 1) for n in ROWS[0]]])
    run = lambda: forward(
        params, jnp.asarray(packed["inputs"]), config, valid=packed["valid"], document_start=packed["document_start"]
    )
    with_resets = run()
    monkeypatch.setattr(sleeplm.core.forward, "reset", lambda caches, prev_valid, *_: (caches, prev_valid))
    jax.clear_caches()  # trace again with the patched reset, and drop that trace afterwards
    try:
        without = run()
    finally:
        jax.clear_caches()
    second = slice(WINDOW, 2 * WINDOW)
    assert np.max(np.abs(with_resets[:, second] - without[:, second])) > 1e-3
