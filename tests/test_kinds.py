"""Extending the model and the tasks without editing the package: every parameter's declared sharding and optimiser
role against a table written out here; a mixer kind and a task defined and registered in this file alone, streamed,
and trained on 8 fake devices (`extension_check.py`, a subprocess); and the errors an incomplete kind meets."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sleeplm import Config, ModelConfig, SleepConfig, forward, init_params, init_state, wake_step
from sleeplm.core.checks import check_config
from sleeplm.core.parameters import param_logical_axes
from sleeplm.data import Task, TaskSource, Vocabulary, register_task
from sleeplm.experiment.schema import TrainConfig
from sleeplm.model.kinds import MIXERS, register_mixer
from sleeplm.model.mixer import Mixer, WindowContext, axes_like
from sleeplm.model.params import dense, param
from sleeplm.parallel.axes import RULES
from sleeplm.parallel.mesh import MeshConfig, make_mesh, train_state_shardings
from sleeplm.training.optimizer import optimizer_labels
from sleeplm.training.step import init_train_state

# Every parameter of a two-block attention + GDN model (short convolution on): its logical axes, whether Muon
# optimises it, and its PartitionSpec under the "fsdp+tp" rules.
PARAMETER_TABLE = {
    "blocks_0/attn/k/kernel": (("embed", "heads"), True, ("fsdp", "tensor")),
    "blocks_0/attn/o/kernel": (("heads", "embed"), True, ("tensor", "fsdp")),
    "blocks_0/attn/q/kernel": (("embed", "heads"), True, ("fsdp", "tensor")),
    "blocks_0/attn/v/kernel": (("embed", "heads"), True, ("fsdp", "tensor")),
    "blocks_0/mixer_norm/scale": ((None,), False, (None,)),
    "blocks_0/mlp/down/kernel": (("mlp", "embed"), True, ("tensor", "fsdp")),
    "blocks_0/mlp/gate/kernel": (("embed", "mlp"), True, ("fsdp", "tensor")),
    "blocks_0/mlp/up/kernel": (("embed", "mlp"), True, ("fsdp", "tensor")),
    "blocks_0/mlp_norm/scale": ((None,), False, (None,)),
    "blocks_1/gdn/A_log": ((None,), False, (None,)),
    "blocks_1/gdn/a/kernel": (("embed", None), False, ("fsdp", None)),
    "blocks_1/gdn/b/kernel": (("embed", None), False, ("fsdp", None)),
    "blocks_1/gdn/conv": ((None, None), False, (None, None)),
    "blocks_1/gdn/dt_bias": ((None,), False, (None,)),
    "blocks_1/gdn/gate/kernel": (("embed", "heads"), True, ("fsdp", "tensor")),
    "blocks_1/gdn/k/kernel": (("embed", "heads"), True, ("fsdp", "tensor")),
    "blocks_1/gdn/o/kernel": (("heads", "embed"), True, ("tensor", "fsdp")),
    "blocks_1/gdn/out_norm/scale": ((None,), False, (None,)),
    "blocks_1/gdn/q/kernel": (("embed", "heads"), True, ("fsdp", "tensor")),
    "blocks_1/gdn/v/kernel": (("embed", "heads"), True, ("fsdp", "tensor")),
    "blocks_1/mixer_norm/scale": ((None,), False, (None,)),
    "blocks_1/mlp/down/kernel": (("mlp", "embed"), True, ("tensor", "fsdp")),
    "blocks_1/mlp/gate/kernel": (("embed", "mlp"), True, ("fsdp", "tensor")),
    "blocks_1/mlp/up/kernel": (("embed", "mlp"), True, ("fsdp", "tensor")),
    "blocks_1/mlp_norm/scale": ((None,), False, (None,)),
    "embedding/embedding": ((None, "embed"), False, (None, "fsdp")),
    "final_norm/scale": ((None,), False, (None,)),
    "head/kernel": (("embed", "vocab"), False, ("fsdp", "tensor")),
}


def _by_name(tree) -> dict:
    """{"blocks_0/attn/q/kernel": leaf, ...} for a tree under a 'params' collection."""
    leaves = jax.tree_util.tree_leaves_with_path(tree, is_leaf=lambda x: isinstance(x, tuple))
    names = ["/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path) for path, _ in leaves]
    return {
        name[name.rindex("params/") + len("params/") :]: leaf for name, (_, leaf) in zip(names, leaves, strict=True)
    }


def test_every_parameter_declares_the_axes_optimiser_and_sharding_of_the_table():
    config = Config(ModelConfig(vocab_size=16, d_model=32, layers=("attn", "gdn"), num_heads=2), SleepConfig(6, 2))
    train = TrainConfig(steps=4, batch_size=2, warmup_steps=1)
    abstract = jax.eval_shape(lambda key: init_train_state(key, config, train), jax.random.key(0))
    mesh = make_mesh(MeshConfig(1, 1, 1))
    axes, labels = _by_name(param_logical_axes(config)), _by_name(optimizer_labels(config))
    specs = {
        name: tuple(s.spec)
        for name, s in _by_name(train_state_shardings(abstract, mesh, RULES["fsdp+tp"], config).params).items()
    }
    assert sorted(axes) == sorted(labels) == sorted(specs) == sorted(PARAMETER_TABLE)
    for name, (logical, muon, spec) in PARAMETER_TABLE.items():
        assert (tuple(axes[name]), labels[name] == "muon", specs[name]) == (logical, muon, spec), name
    # Optimizer state mirrors its parameter; under "dp" (ZeRO-1) its embed dim is split over the batch axes instead.
    dp = train_state_shardings(abstract, mesh, RULES["dp"], config)
    moments = [
        s.spec
        for path, s in jax.tree_util.tree_leaves_with_path(dp.opt_state)
        if "blocks_0" in jax.tree_util.keystr(path) and "'up'" in jax.tree_util.keystr(path)
    ]
    assert moments and all(tuple(spec) == (("data", "fsdp"), None) for spec in moments)
    assert tuple(_by_name(dp.params)["blocks_0/mlp/up/kernel"].spec) == (None, None)


# --- A mixer kind and a task that live only in this file --------------------------------------------------------


class RunningMean(NamedTuple):
    """The toy kind's cache: a per-head exponential running mean (B, H, head_dim), float32; it survives eviction."""

    mean: jax.Array


class ExponentialMixer(Mixer):
    """Each head keeps an exponential running mean of a projection of its inputs (decay sigmoid(d) per head) and
    reads it out through an output projection: a minimal recurrent mixer with a state of its own."""

    @classmethod
    def init_cache(cls, config: Config, batch: int, capacity: int) -> RunningMean:
        model = config.model
        return RunningMean(jnp.zeros((batch, model.num_heads, model.head_dim), jnp.float32))

    @classmethod
    def evict(cls, cache: RunningMean, eviction) -> RunningMean:
        return cache

    @classmethod
    def cache_axes(cls, cache: RunningMean) -> RunningMean:
        return axes_like(cache, "batch", "heads", None)

    @classmethod
    def split_sizes(cls, model: ModelConfig) -> dict[str, dict[str, int]]:
        return {"heads": {"model.num_heads": model.num_heads}}

    @nn.compact
    def __call__(self, x: jax.Array, cache: RunningMean, context: WindowContext) -> tuple[jax.Array, RunningMean]:
        model = self.config.model
        batch, length, _ = x.shape
        heads, width = model.num_heads, model.head_dim
        inputs = dense(heads * width, ("embed", "heads"), "into", x.dtype)(x).reshape(batch, length, heads, width)
        keep = jax.nn.sigmoid(param(self, "decay", nn.initializers.ones, (heads,), (None,)))[:, None]

        def step(mean, inputs_t):
            u, valid = inputs_t  # padding (valid False) leaves the mean as it is
            mean = jnp.where(valid[:, None, None], keep * mean + (1 - keep) * u.astype(jnp.float32), mean)
            return mean, mean

        mean, means = jax.lax.scan(step, cache.mean, (jnp.moveaxis(inputs, 1, 0), context.valid.T))
        out = jnp.moveaxis(means, 0, 1).reshape(batch, length, heads * width).astype(x.dtype)
        return dense(model.d_model, ("heads", "embed"), "out", x.dtype)(out), RunningMean(mean)


register_mixer("running_mean", ExponentialMixer)


@dataclasses.dataclass(frozen=True)
class RecallConfig:
    """Random symbols over `windows` windows, then `<query>` and the first symbol again (the label)."""

    symbols: int = 3
    windows: int = 2
    window: int = 4

    @property
    def sequence_length(self) -> int:
        return self.windows * self.window + 1

    @property
    def vocab(self) -> Vocabulary:
        return Vocabulary(("<query>", *(f"s{i}" for i in range(self.symbols))))


class RecallSource(TaskSource):
    def sample(self, rng: np.random.Generator):
        cfg = self.config
        body = rng.integers(1, cfg.symbols + 1, size=cfg.windows * cfg.window)
        tokens = np.concatenate([body, [0, body[0]]]).astype(np.int32)
        return tokens, np.asarray([len(tokens) - 1]), {}, tokens.tobytes()


RECALL = register_task(Task("first_symbol_recall", RecallConfig, RecallSource))


def recall_experiment():
    """A tiny experiment of the toy task on the toy kind followed by attention, N = 2."""
    from sleeplm.experiment.schema import Experiment, RunConfig

    task = RecallConfig()
    model = ModelConfig(
        vocab_size=len(task.vocab), d_model=16, layers=("running_mean", "attn"), num_heads=2, mlp_dim=32
    )
    return Experiment(
        task,
        Config(model, SleepConfig(window=task.window, passes=2)),
        TrainConfig(steps=3, batch_size=8, warmup_steps=1, muon_lr=2e-2, adam_lr=1e-2),
        RunConfig(eval_every=3, eval_examples=16, eval_batch_size=8, checkpoint_every=3, progress=False),
    )


def test_a_kind_registered_here_streams_like_forward():
    config = recall_experiment().config
    params = init_params(jax.random.key(0), config)
    params = jax.tree.map(lambda x: x + 0.2 * jax.random.normal(jax.random.key(1), x.shape), params)
    tokens = jax.random.randint(jax.random.key(2), (2, 11), 0, config.model.vocab_size)
    expected = forward(params, tokens, config)
    state, streamed = init_state(config, 2), []
    for t in range(tokens.shape[1]):
        logits, state = wake_step(params, state, tokens[:, t : t + 1], config)
        streamed.append(logits)
    np.testing.assert_allclose(jnp.concatenate(streamed, 1), expected, rtol=1e-5, atol=1e-5)
    assert state.caches[0].mean.shape == (2, 2, 8) and "running_mean" in params["params"]["blocks_0"]


@pytest.mark.parametrize("kind", sorted(MIXERS))
def test_padding_changes_no_kinds_cache(kind):
    """The mixer contract for every registered kind: a row's padded positions (valid False) leave its cache as it
    was, while the same tokens, real, change it."""
    model = ModelConfig(vocab_size=16, d_model=32, layers=(kind,), num_heads=2, mlp_dim=32)
    config = Config(model, SleepConfig(window=6, passes=2))
    params = init_params(jax.random.key(0), config)
    params = jax.tree.map(lambda x: x + 0.2 * jax.random.normal(jax.random.key(1), x.shape), params)
    tokens = jax.random.randint(jax.random.key(2), (2, 6), 0, model.vocab_size)
    _, state = wake_step(params, init_state(config, 2), tokens[:, :3], config)  # some history first
    before = jax.tree.map(np.asarray, state.caches)
    valid = np.array([[True] * 3, [False] * 3])
    _, state = wake_step(params, state, tokens[:, 3:], config, valid=valid)
    assert list(np.asarray(state.pos)) == [6, 3]
    changed = False
    for old, new in zip(jax.tree.leaves(before), jax.tree.leaves(state.caches), strict=True):
        np.testing.assert_array_equal(np.asarray(new)[1], old[1])
        changed |= not np.array_equal(np.asarray(new)[0], old[0])
    assert changed


@pytest.mark.slow  # an 8-device subprocess: ~50 s
def test_a_kind_and_a_task_registered_here_train_sharded_on_8_devices_like_on_one():
    script = Path(__file__).with_name("extension_check.py")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=900, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULTS ")]
    assert done.returncode == 0 and lines, done.stderr[-3000:]
    results = json.loads(lines[-1][len("RESULTS ") :])
    assert results["devices"] == 8 and len(results["sharded"]["losses"]) == 3
    np.testing.assert_allclose(results["sharded"]["losses"], results["single"]["losses"], rtol=1e-5)
    np.testing.assert_allclose(results["sharded"]["eval_loss"], results["single"]["eval_loss"], rtol=1e-5)
    assert results["mean_spec"] == [["data", "fsdp"], "tensor", None]  # the toy cache, sharded as it declares
    assert results["into_spec"] == ["fsdp", "tensor"]


class Undeclared(Mixer):
    """A kind whose parameter is created with plain flax, without logical axes or an optimiser role."""

    @classmethod
    def init_cache(cls, config, batch, capacity):
        return ()

    @nn.compact
    def __call__(self, x, cache, context):
        return nn.Dense(x.shape[-1], use_bias=False, name="plain")(x), cache


def test_incomplete_or_unknown_kinds_fail_clearly():
    register_mixer("undeclared", Undeclared)
    config = Config(ModelConfig(vocab_size=8, d_model=8, layers=("undeclared",), num_heads=2), SleepConfig(4, 1))
    from sleeplm.core.parameters import param_annotations

    with pytest.raises(
        ValueError,
        match=r"parameter \['params'\]\['blocks_0'\]\['undeclared'\]\['plain'\]\['kernel'\] has no annotation",
    ):
        param_annotations(config)
    with pytest.raises(ValueError, match=r"layers\[1\]='mamba' is invalid: allowed mixers are \('attn', 'gdn'"):
        check_config(Config(ModelConfig(layers=("attn", "mamba"))))
    with pytest.raises(ValueError, match=r"mixer kind 'attn' is already registered"):
        register_mixer("attn", ExponentialMixer)
    with pytest.raises(TypeError, match=r"must be a subclass of sleeplm.model.mixer.Mixer"):
        register_mixer("function", lambda x: x)
    assert MIXERS["running_mean"] is ExponentialMixer
