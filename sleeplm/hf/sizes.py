"""Parameter count and training state of a pretrained-size hybrid, without allocating it: the README's numbers.

`QWEN3_NEXT_STYLE_1B` is a Qwen3-Next-layout config.json scaled down to about a billion parameters (the family's
own layout: three Gated DeltaNet layers per gated-attention layer, partial rotary, zero-centred norms, a tied
151,936-token embedding). `python -m sleeplm.hf.sizes` prints its parameter count by optimizer role and the bytes
of its parameters, gradients and optimizer state (Muon momentum, AdamW moments), from the abstract train state
(`jax.eval_shape`: nothing of that size is made). Activations depend on the batch, window and passes; the README
estimates them.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp

from sleeplm.config import Config, SleepConfig
from sleeplm.core.parameters import init_params
from sleeplm.experiment.schema import TrainConfig
from sleeplm.hf.families import model_config
from sleeplm.training.optimizer import make_optimizer, optimizer_labels
from sleeplm.training.step import TrainState

QWEN3_NEXT_STYLE_1B = {
    "architectures": ["Qwen3NextForCausalLM"],
    "model_type": "qwen3_next",
    "vocab_size": 151936,
    "hidden_size": 1536,
    "num_hidden_layers": 24,
    "layer_types": ["linear_attention", "linear_attention", "linear_attention", "full_attention"] * 6,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "head_dim": 256,
    "rope_parameters": {"rope_type": "default", "rope_theta": 10000000.0, "partial_rotary_factor": 0.25},
    "linear_num_key_heads": 8,
    "linear_num_value_heads": 16,
    "linear_key_head_dim": 128,
    "linear_value_head_dim": 128,
    "linear_conv_kernel_dim": 4,
    "intermediate_size": 4608,
    "num_experts": 0,
    "rms_norm_eps": 1e-6,
    "hidden_act": "silu",
    "tie_word_embeddings": True,
}

GIB = 1 << 30


def parameter_counts(config: Config) -> dict[str, int]:
    """Scalars per optimizer role ("muon", "adam") and in all."""
    shapes = jax.eval_shape(lambda: init_params(jax.random.key(0), config))
    labels = jax.tree.leaves(optimizer_labels(config))
    sizes = [int(x.size) for x in jax.tree.leaves(shapes)]
    by_role = lambda role: sum(size for size, label in zip(sizes, labels, strict=True) if label == role)
    return {"muon": by_role("muon"), "adam": by_role("adam"), "all": sum(sizes)}


def state_gib(config: Config) -> dict[str, float]:
    """GiB of the parameters, their gradients and the optimizer state (float32, as training holds them)."""
    train = TrainConfig(steps=10, batch_size=1, warmup_steps=1)

    def initial_state() -> TrainState:
        params = init_params(jax.random.key(0), config)
        return TrainState(params, make_optimizer(train, config).init(params), jnp.zeros((), jnp.int32))

    state = jax.eval_shape(initial_state)
    gib = lambda tree: sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree)) / GIB
    return {"parameters": gib(state.params), "gradients": gib(state.params), "optimizer_state": gib(state.opt_state)}


def main() -> None:
    config = Config(model_config(QWEN3_NEXT_STYLE_1B), SleepConfig(window=1024, passes=2, eviction="sliding"))
    blocks = {kind: config.model.layers.count(kind) for kind in dict.fromkeys(config.model.layers)}
    report = {"blocks": blocks, "parameters": parameter_counts(config), "gib": state_gib(config)}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
