"""Sleep passes over a contiguous subset of blocks (`sleep.loop_layers`): N = 1 is the unlooped model; with N > 1
forward, streaming and the looped reference agree, and only the chosen blocks run the extra passes (counted at
run time by mixer kinds registered here that report each call)."""

from __future__ import annotations

import collections
import dataclasses
import functools

import jax
import numpy as np
import pytest
import reference_model
from test_sleep import WINDOW, assert_close, make_config, perturbed, stream, tokens_for

from sleeplm import Config, forward, forward_with_state, init_params
from sleeplm.model.attention import Attention
from sleeplm.model.gdn import GatedDeltaNet
from sleeplm.model.kinds import register_mixer

FOUR = ("attn", "gdn", "attn", "gdn")
looped_sleep_forward = jax.jit(reference_model.looped_sleep_forward, static_argnums=(2, 3))


def looping(config: Config, blocks) -> Config:
    return dataclasses.replace(config, sleep=dataclasses.replace(config.sleep, loop_layers=blocks))


def test_one_pass_with_looped_blocks_is_the_unlooped_model():
    config = make_config(1, "hard", layers=FOUR)
    params = perturbed(init_params(jax.random.key(61), config), jax.random.key(62))
    tokens = tokens_for(3 * WINDOW + 2)
    np.testing.assert_array_equal(forward(params, tokens, looping(config, (1, 3))), forward(params, tokens, config))


@pytest.mark.parametrize(
    ("eviction", "blocks"),
    [
        ("hard", (1, 3)),
        pytest.param("sliding", (0, 2), marks=pytest.mark.slow),
        pytest.param("hard", (2, 4), marks=pytest.mark.slow),
    ],
)
def test_looped_blocks_agree_across_forward_streaming_and_the_reference(eviction, blocks):
    config = looping(make_config(3, eviction, layers=FOUR), blocks)
    params = perturbed(init_params(jax.random.key(63), config), jax.random.key(64))
    tokens = tokens_for(3 * WINDOW + 2, seed=65)
    logits, state = forward_with_state(params, tokens, config)
    expected, fast_weights = looped_sleep_forward(params, tokens, config, True)
    assert_close(logits, expected)
    for i in (1, 3):
        assert_close(state.caches[i].S, fast_weights[i])
    streamed, streamed_state = stream(params, tokens, config, piece_sizes=(4, 3))
    assert_close(streamed, logits)
    for ours, theirs in zip(jax.tree.leaves(state.caches), jax.tree.leaves(streamed_state.caches), strict=True):
        assert_close(ours, theirs)
    unlooped = make_config(3, eviction, layers=FOUR)
    assert np.max(np.abs(forward(params, tokens, unlooped)[:, WINDOW:] - logits[:, WINDOW:])) > 1e-3


CALLS: collections.Counter = collections.Counter()


def counted(kind):
    """`kind` that adds one to CALLS[its block] each time it runs (a run-time callback, so passes skipped by a
    `lax.cond` do not count)."""

    class Counted(kind):
        def __call__(self, x, cache, context):
            block = self.scope.path[-2]
            jax.debug.callback(functools.partial(CALLS.update, [block]))
            return super().__call__(x, cache, context)

    return Counted


register_mixer("counted_attn", counted(Attention))
register_mixer("counted_gdn", counted(GatedDeltaNet))


def test_only_the_looped_blocks_run_the_sleep_passes():
    config = looping(make_config(3, "hard", layers=("counted_attn", "counted_gdn") * 2), (1, 3))
    params = init_params(jax.random.key(0), config)
    CALLS.clear()
    jax.block_until_ready(forward(params, tokens_for(3 * WINDOW + 2), config))
    # 4 windows each get a wake pass; the 3 full ones followed by more tokens also get 2 sleep passes.
    assert dict(CALLS) == {"blocks_0": 4, "blocks_1": 4 + 3 * 2, "blocks_2": 4 + 3 * 2, "blocks_3": 4}


def test_loop_layers_outside_the_model_fail_clearly():
    with pytest.raises(
        ValueError, match=r"sleep.loop_layers=\(2, 5\) is invalid: must lie within the model's 4 blocks"
    ):
        looping(make_config(2, "hard", layers=FOUR), (2, 5))
    with pytest.raises(ValueError, match=r"sleep.loop_layers=\(3, 3\) is invalid: must satisfy 0 <= start < stop"):
        looping(make_config(2, "hard", layers=FOUR), (3, 3))
