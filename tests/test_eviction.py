"""Eviction modes through their hooks: the attention-sinks mode ("sinks:S", StreamingLLM) streamed against `forward`,
against an independent float64 NumPy attention over exactly the set {p <= q: q - p < L or p < S}, under generation
and scoring; its validation; and a mode registered from this file (outside the package) working end to end."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from test_sleep import MODEL, WINDOW, assert_close, perturbed, stream, tokens_for

from sleeplm import Config, ModelConfig, SleepConfig, forward, forward_with_state, init_params
from sleeplm.eviction import EVICTIONS, eviction_mode, register_eviction
from sleeplm.eviction.sinks import Sinks
from sleeplm.inference.generate import generate
from sleeplm.inference.score import score
from sleeplm.inference.streams import start_stream


def sinks_config(eviction="sinks:2", passes=2, **model_overrides) -> Config:
    return Config(dataclasses.replace(MODEL, **model_overrides), SleepConfig(WINDOW, passes, eviction))


def assert_streams_like_forward(config, length=4 * WINDOW + 3, seed=61):
    """forward == streaming token by token == streaming in ragged pieces, and forward ends in streaming's state."""
    params = perturbed(init_params(jax.random.key(seed), config), jax.random.key(seed + 1))
    tokens = tokens_for(length, seed=seed + 2)
    logits, state = forward_with_state(params, tokens, config)
    by_token, _ = stream(params, tokens, config)
    assert_close(by_token, logits)
    in_pieces, streamed_state = stream(params, tokens, config, piece_sizes=(4, 1, 3), explicit_sleep=True)
    assert_close(in_pieces, logits)
    np.testing.assert_array_equal(state.pos, streamed_state.pos)
    np.testing.assert_array_equal(state.prev_valid, streamed_state.prev_valid)
    for ours, theirs in zip(jax.tree.leaves(state.caches), jax.tree.leaves(streamed_state.caches), strict=True):
        if jnp.issubdtype(ours.dtype, jnp.floating):
            assert_close(ours, theirs)
        else:  # the mode's flags
            np.testing.assert_array_equal(ours, theirs)
    return params, tokens, logits


@pytest.mark.parametrize("eviction", ["sinks:2", "sinks"])
def test_sinks_forward_equals_streaming_and_final_states(eviction):
    assert_streams_like_forward(sinks_config(eviction))


def test_sinks_differ_from_sliding_only_after_the_first_window():
    """The sinks matter (the test above would pass for a mode that ignored them): the first window sees the same
    keys as under sliding, later ones the first S tokens too."""
    sinks = sinks_config("sinks:2")
    params = perturbed(init_params(jax.random.key(71), sinks), jax.random.key(72))
    tokens = tokens_for(4 * WINDOW, seed=73)
    with_sinks = np.asarray(forward(params, tokens, sinks))
    sliding = np.asarray(forward(params, tokens, sinks_config("sliding")))
    assert_close(with_sinks[:, :WINDOW], sliding[:, :WINDOW])
    for later in range(1, 4):
        part = slice(later * WINDOW, (later + 1) * WINDOW)
        assert np.max(np.abs(with_sinks[:, part] - sliding[:, part])) > 1e-3


def _rms(x, scale, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * scale


def _rope(x, positions, theta):
    """Half-split RoPE on all dims of x (T, H, d) at positions (T,), float64."""
    half = x.shape[-1] // 2
    angles = positions[:, None] * theta ** (-np.arange(half) / half)
    sin, cos = np.sin(angles)[:, None], np.cos(angles)[:, None]
    return np.concatenate([x[..., :half] * cos - x[..., half:] * sin, x[..., half:] * cos + x[..., :half] * sin], -1)


def reference_sinks_logits(params, tokens, config, sinks):
    """A one-block, attention-only model (no MLP: an inserted block) at N = 1 in float64 NumPy: each query at
    document position q attends to exactly {p <= q: q - p < L or p < S}, with the mode's bounded RoPE positions
    (sinks at 0..S-1, the previous window at S + j, the current window at S + L + j)."""
    m, window = config.model, config.sleep.window
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params["params"])
    block = p["blocks_0"]["attn"]
    x = p["embedding"]["embedding"][tokens]  # (T, d)
    y = _rms(x, p["blocks_0"]["mixer_norm"]["scale"], m.norm_eps)
    heads, kv_heads, d = m.num_heads, m.num_kv_heads, m.head_dim
    q = (y @ block["q"]["kernel"]).reshape(-1, heads, d)
    k = (y @ block["k"]["kernel"]).reshape(-1, kv_heads, d)
    v = (y @ block["v"]["kernel"]).reshape(-1, kv_heads, d)
    length = len(tokens)
    out = np.zeros((length, heads, d))
    for t in range(length):
        w, i = divmod(t, window)
        keys = [s for s in range(t + 1) if t - s < window or s < sinks]

        def position(s, w=w):
            if s // window == w:
                return sinks + window + s % window
            if s // window == w - 1:
                return sinks + s % window
            return s  # a sink

        q_t = _rope(q[t : t + 1], np.array([sinks + window + i], np.float64), m.rope_theta)[0]  # (H, d)
        k_t = _rope(k[keys], np.array([position(s) for s in keys], np.float64), m.rope_theta)  # (M, H_kv, d)
        for h in range(heads):
            g = h // (heads // kv_heads)
            scores = k_t[:, g] @ q_t[h] / np.sqrt(d)
            weights = np.exp(scores - scores.max())
            out[t, h] = (weights / weights.sum()) @ v[keys, g]
    h = x + out.reshape(length, heads * d) @ block["o"]["kernel"]
    return _rms(h, p["final_norm"]["scale"], m.norm_eps) @ p["head"]["kernel"]


@pytest.mark.parametrize("sinks", [0, 2, WINDOW])
def test_sinks_attention_equals_a_float64_brute_force(sinks):
    config = Config(
        ModelConfig(vocab_size=13, d_model=16, layers=("attn",), num_heads=2, num_kv_heads=1, inserted_blocks=(0,)),
        SleepConfig(WINDOW, 1, f"sinks:{sinks}"),
    )
    params = perturbed(init_params(jax.random.key(81), config), jax.random.key(82))
    tokens = np.asarray(tokens_for(4 * WINDOW + 2, batch=1, seed=83))
    logits = np.asarray(forward(params, jnp.asarray(tokens), config))[0]
    expected = reference_sinks_logits(params, tokens[0], config, sinks)
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4 * np.max(np.abs(expected)))


def test_greedy_generation_under_sinks_is_the_argmax_of_forward():
    config = sinks_config("sinks:2", passes=2)
    params = perturbed(init_params(jax.random.key(91), config), jax.random.key(92))
    rng = np.random.default_rng(93)
    prompts = [rng.integers(0, MODEL.vocab_size, n) for n in (3, 2 * WINDOW + 5)]
    stream_ = start_stream(config, len(prompts), jax.random.key(0))
    generated = generate(params, stream_, prompts, config, max_new_tokens=3 * WINDOW)
    for prompt, new in zip(prompts, generated.tokens, strict=True):
        sequence = np.concatenate([prompt, new])
        logits = forward(params, jnp.asarray(sequence[None, :-1]), config)[0]
        np.testing.assert_array_equal(np.argmax(logits, -1)[len(prompt) - 1 :], new)


def test_scores_under_sinks_equal_forward():
    config = sinks_config("sinks:3", passes=2)
    params = perturbed(init_params(jax.random.key(101), config), jax.random.key(102))
    tokens = np.random.default_rng(103).integers(0, MODEL.vocab_size, (2, 5 * WINDOW + 4))
    logits = forward(params, jnp.asarray(tokens[:, :-1]), config)
    expected = -np.asarray(optax.softmax_cross_entropy_with_integer_labels(logits, jnp.asarray(tokens[:, 1:])))
    result = score(params, tokens, config, block_windows=2, keep_token_log_likelihoods=True)
    np.testing.assert_allclose(result.token_log_likelihoods[:, 1:], expected, rtol=1e-5, atol=1e-5)


def test_zero_sinks_is_sliding():
    config = sinks_config("sinks:0")
    params = perturbed(init_params(jax.random.key(111), config), jax.random.key(112))
    tokens = tokens_for(3 * WINDOW + 1, seed=113)
    assert_close(forward(params, tokens, config), forward(params, tokens, sinks_config("sliding")))


@pytest.mark.parametrize(
    ("eviction", "message"),
    [
        (f"sinks:{WINDOW + 1}", rf"sleep.eviction='sinks:{WINDOW + 1}' is invalid: keeps {WINDOW + 1} sink tokens"),
        ("sinks:-1", r"sleep.eviction='sinks:-1' is invalid: keeps -1 sink tokens"),
        ("sinks:x", r"sleep.eviction='sinks:x' is invalid: 'sinks' the number of sink tokens must be an integer"),
        ("sliding:2", r"sleep.eviction='sliding:2' is invalid: 'sliding' takes no argument"),
        ("soft:2", r"sleep.eviction='soft:2' is invalid: allowed modes are \('hard', 'sliding', 'none', 'sinks'"),
    ],
)
def test_bad_eviction_values_fail_naming_the_field(eviction, message):
    with pytest.raises(ValueError, match=message):
        SleepConfig(WINDOW, 2, eviction)


def test_parsed_modes():
    assert eviction_mode("sinks:3") == Sinks(sinks=3)
    assert eviction_mode("sinks").sinks == Sinks().sinks > 0
    assert SleepConfig(WINDOW, 2, "sinks:1").eviction_mode.attended_keys(WINDOW) == 2 * WINDOW + 1


@dataclasses.dataclass(frozen=True)
class Anchors(Sinks):
    """A user's mode, defined and registered here: the sinks behaviour under its own name and default."""

    name: str = "anchors"
    sinks: int = 3


def test_a_mode_registered_outside_the_package_works_end_to_end():
    register_eviction(Anchors())
    try:
        assert_streams_like_forward(sinks_config("anchors:1"), length=3 * WINDOW + 2, seed=121)
        with pytest.raises(ValueError, match="already registered"):
            register_eviction(Anchors(sinks=1))
    finally:
        EVICTIONS.pop("anchors")
