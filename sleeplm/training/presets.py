"""The named presets: each experiment at paper or accelerator scale and at CPU scale (`sleeplm presets` lists them)."""

from __future__ import annotations

from sleeplm.config import Config, ModelConfig, SleepConfig
from sleeplm.data import ArithConfig, DepoConfig, RecallConfig, Rule110Config, TextConfig
from sleeplm.experiment.overrides import override_experiment
from sleeplm.experiment.schema import Experiment, RunConfig, TrainConfig, align_task_and_model

ALTERNATING4 = ("attn", "gdn", "attn", "gdn")


def _model(d_model: int, heads: int, layers=ALTERNATING4) -> ModelConfig:
    return ModelConfig(d_model=d_model, layers=layers, num_heads=heads)


PRESETS: dict[str, Experiment] = {
    # Paper scale (docs/method.md, "The paper's numbers"): 4 layers, d=256, L=24, batch 512, Muon 2e-3.
    "rule110": Experiment(
        Rule110Config(width=24, num_strings=4, steps=32),
        Config(_model(256, 4), SleepConfig(window=24, passes=1)),
        TrainConfig(steps=20_000, batch_size=512, warmup_steps=500),
        RunConfig(eval_every=500, eval_examples=2048, eval_batch_size=256, checkpoint_every=1000),
    ),
    # CPU scale: trains in minutes on 2 cores.
    "rule110-cpu": Experiment(
        Rule110Config(width=12, num_strings=4, steps=2),
        Config(_model(64, 4), SleepConfig(window=12, passes=1)),
        TrainConfig(steps=400, batch_size=64, warmup_steps=20),
        RunConfig(eval_every=50, eval_examples=512, eval_batch_size=256, checkpoint_every=100),
    ),
    "depo": Experiment(
        DepoConfig(max_nodes=75, min_nodes=75, name_length=2, name_tokens=50, max_hops=16, queries=10),
        Config(_model(512, 8, ALTERNATING4 * 2 + ("attn", "gdn")), SleepConfig(window=75, passes=1)),
        TrainConfig(steps=20_000, batch_size=256, warmup_steps=500),
        RunConfig(eval_every=500, eval_examples=1024, eval_batch_size=128, checkpoint_every=1000),
    ),
    "depo-cpu": Experiment(
        DepoConfig(max_nodes=24, min_nodes=16, name_length=1, name_tokens=32, max_hops=8, queries=8),
        Config(_model(128, 4), SleepConfig(window=16, passes=1)),
        TrainConfig(steps=600, batch_size=32, warmup_steps=30),
        RunConfig(eval_every=100, eval_examples=256, eval_batch_size=128, checkpoint_every=200),
    ),
    "arith": Experiment(
        ArithConfig(num_vars=64, modulus=10, min_ops=1, max_ops=8, windows=4),
        Config(_model(256, 4), SleepConfig(window=64, passes=1)),
        TrainConfig(steps=20_000, batch_size=256, warmup_steps=500),
        RunConfig(eval_every=500, eval_examples=2048, eval_batch_size=256, checkpoint_every=1000),
    ),
    "arith-cpu": Experiment(
        ArithConfig(num_vars=32, modulus=5, min_ops=1, max_ops=4, windows=3),
        Config(_model(128, 4), SleepConfig(window=32, passes=1)),
        TrainConfig(steps=600, batch_size=32, warmup_steps=30),
        RunConfig(eval_every=100, eval_examples=512, eval_batch_size=128, checkpoint_every=200),
    ),
    # Recall from evicted windows: 2 facts in each of 3 windows (4 of them queried), hard eviction. N by
    # `--sleep.passes`, eviction by `--sleep.eviction`, distance / load / overwrites / hops by `--task.*`.
    "recall-cpu": Experiment(
        RecallConfig(windows=3, pairs_per_window=2, min_distance=1, max_distance=3, queries=4),
        Config(_model(64, 4), SleepConfig(window=16, passes=1, eviction="hard")),
        TrainConfig(steps=800, batch_size=64, warmup_steps=40),
        RunConfig(eval_every=100, eval_examples=512, eval_batch_size=256, checkpoint_every=200),
    ),
    # Language modelling on text files (default: the Python standard library's .py files: 9.4M tokens at a vocabulary
    # of 4096, 8.0M at 32768). `--task.files 'corpus/**/*.jsonl'` trains on other text.
    # For an accelerator: 139M parameters (89M in the blocks, 50M in the embedding and the head), rows of 4 x 512
    # tokens. On the default corpus an epoch is 3729 rows (58 steps): meant for a larger corpus.
    "lm": Experiment(
        TextConfig(vocab_size=32768, windows=4),
        Config(
            ModelConfig(d_model=768, layers=ALTERNATING4 * 3, num_heads=12, mlp_dim=2048),
            SleepConfig(window=512, passes=1),
        ),
        TrainConfig(steps=20_000, batch_size=64, warmup_steps=1000),
        RunConfig(eval_every=1000, eval_examples=256, eval_batch_size=32, checkpoint_every=1000),
    ),
    # CPU scale: 2.1M parameters, rows of 4 x 64 tokens; about 2 s a step on 2 shared cores, so about 30 minutes.
    "lm-cpu": Experiment(
        TextConfig(vocab_size=4096, windows=4),
        Config(_model(128, 2), SleepConfig(window=64, passes=1)),
        TrainConfig(steps=800, batch_size=16, warmup_steps=40),
        RunConfig(eval_every=100, eval_examples=128, eval_batch_size=64, checkpoint_every=200),
    ),
}


def build_experiment(preset: str, overrides: dict[str, str] | None = None) -> Experiment:
    """The preset named `preset` with `overrides` applied, made consistent (`align_task_and_model`)."""
    if preset not in PRESETS:
        raise ValueError(f"preset {preset!r} is unknown: choose one of {sorted(PRESETS)}")
    return align_task_and_model(override_experiment(PRESETS[preset], overrides or {}))
