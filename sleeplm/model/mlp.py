"""SwiGLU feed-forward block."""

from __future__ import annotations

import flax.linen as nn
import jax

from sleeplm.config import ModelConfig
from sleeplm.model.params import dense


class MLP(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        up = lambda name: dense(self.config.mlp_dim, ("embed", "mlp"), name, x.dtype)
        hidden = nn.silu(up("gate")(x)) * up("up")(x)
        return dense(self.config.d_model, ("mlp", "embed"), "down", x.dtype)(hidden)
