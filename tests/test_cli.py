"""The command line entry point (argument handling; training through the CLI is in test_loop.py)."""

from __future__ import annotations

import pytest

from sleeplm.cli.main import main
from sleeplm.training.presets import PRESETS


def test_unknown_command_names_the_choices(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["bogus"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'bogus'" in capsys.readouterr().err


def test_presets_lists_every_preset(capsys):
    main(["presets"])
    out = capsys.readouterr().out
    assert all(name in out for name in PRESETS)


def test_stray_arguments_to_eval_are_rejected():
    with pytest.raises(SystemExit, match=r"unrecognized arguments: --sleep.passes 2"):
        main(["eval", "--workdir", "x", "--sleep.passes", "2"])


def test_stream_demo_reproduces_forward():
    from sleeplm.cli.stream_demo import run_demo
    from sleeplm.config import Config, ModelConfig, SleepConfig

    tiny = Config(ModelConfig(vocab_size=16, d_model=16, layers=("attn", "gdn"), num_heads=2), SleepConfig(window=4))
    rows = run_demo(tiny, passes=(2,), windows=3, batch=2)
    assert rows[0]["passes"] == 2 and rows[0]["stream_vs_forward_rel_error"] < 1e-4
    assert all(rows[0][key] > 0 for key in ("wake_token_s", "wake_window_s", "sleep_s"))


def test_generate_leaves_the_callers_per_row_keys_usable():
    """`start_stream` with one key per row copies them: `generate` donates the stream, which must not delete the
    caller's key array (the rows' keys are used again here, to start a second stream that samples the same)."""
    import jax
    import numpy as np

    from sleeplm import Config, ModelConfig, SleepConfig, init_params
    from sleeplm.inference.generate import Sampling, generate
    from sleeplm.inference.streams import start_stream

    config = Config(
        ModelConfig(vocab_size=16, d_model=16, num_heads=2, mlp_dim=32, layers=("attn",)), SleepConfig(4, 1)
    )
    params = init_params(jax.random.key(0), config)
    keys = jax.random.split(jax.random.key(3), 2)
    runs = []
    for _ in range(2):
        stream = start_stream(config, 2, keys)
        result = generate(params, stream, [[1, 2], [3]], config, max_new_tokens=3, sampling=Sampling(temperature=1.0))
        runs.append(np.asarray(result.tokens))
    np.testing.assert_array_equal(jax.random.key_data(keys), jax.random.key_data(keys))  # still alive
    np.testing.assert_array_equal(runs[0], runs[1])
