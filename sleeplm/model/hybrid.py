"""The hybrid block stack of SPEC §2: Embed -> blocks (pre-norm mixer + residual, pre-norm MLP + residual)
-> final norm -> output projection. Used only through pure `init` / `apply` with explicit per-layer state."""

from __future__ import annotations

import flax.linen as nn
import jax

from sleeplm.config import Config
from sleeplm.model.attention import Attention
from sleeplm.model.gdn import GatedDeltaNet
from sleeplm.model.mlp import MLP
from sleeplm.model.norms import RMSNorm
from sleeplm.state import LayerState, activation_dtype


class Block(nn.Module):
    config: Config
    kind: str

    @nn.compact
    def __call__(
        self, h: jax.Array, layer_state: LayerState, pos: jax.Array, prev_valid: jax.Array
    ) -> tuple[jax.Array, LayerState]:
        model = self.config.model
        y = RMSNorm(model.norm_eps, name="mixer_norm")(h)
        if self.kind == "attn":
            y, layer_state = Attention(model, self.config.sleep.window, name="attn")(y, layer_state, pos, prev_valid)
        else:
            y, layer_state = GatedDeltaNet(model, name="gdn")(y, layer_state, pos)
        h = h + y
        h = h + MLP(model, name="mlp")(RMSNorm(model.norm_eps, name="mlp_norm")(h))
        return h, layer_state


class HybridLM(nn.Module):
    config: Config

    def setup(self) -> None:
        model = self.config.model
        self.embedding = nn.Embed(model.vocab_size, model.d_model, embedding_init=nn.initializers.normal(1.0))
        self.blocks = [Block(self.config, kind) for kind in model.layers]
        self.final_norm = RMSNorm(model.norm_eps)
        self.head = nn.Dense(model.vocab_size, use_bias=False)

    def embed(self, tokens: jax.Array) -> jax.Array:
        return self.embedding(tokens).astype(activation_dtype(self.config))

    def window_pass(
        self, h: jax.Array, layers: tuple[LayerState, ...], pos: jax.Array, prev_valid: jax.Array
    ) -> tuple[jax.Array, tuple[LayerState, ...]]:
        """One pass of the whole block stack over window positions pos .. pos + n - 1 (h: (B, n, d))."""
        new_layers = []
        for block, layer_state in zip(self.blocks, layers, strict=True):
            h, layer_state = block(h, layer_state, pos, prev_valid)
            new_layers.append(layer_state)
        return h, tuple(new_layers)

    def logits(self, h: jax.Array) -> jax.Array:
        return self.head(self.final_norm(h).astype(jax.numpy.float32))

    def __call__(self, tokens: jax.Array, layers: tuple[LayerState, ...], pos: jax.Array, prev_valid: jax.Array):
        h, layers = self.window_pass(self.embed(tokens), layers, pos, prev_valid)
        return self.logits(h), layers
