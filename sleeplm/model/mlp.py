"""SwiGLU feed-forward block."""

from __future__ import annotations

import flax.linen as nn
import jax

from sleeplm.config import ModelConfig


class MLP(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        dense = lambda features, name: nn.Dense(features, use_bias=False, dtype=x.dtype, name=name)
        hidden = nn.silu(dense(self.config.hidden_dim, "gate")(x)) * dense(self.config.hidden_dim, "up")(x)
        return dense(self.config.d_model, "down")(hidden)
