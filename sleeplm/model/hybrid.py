"""The hybrid block stack (docs/method.md, "The model"): Embed -> blocks (pre-norm mixer + residual, pre-norm MLP +
residual) -> final norm -> output projection (or the embedding table, when tied). Used only through pure `init` /
`apply` with explicit per-layer caches; each block's mixer is the kind its `ModelConfig.layers` entry names."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from sleeplm.config import Config
from sleeplm.model.kinds import mixer_kind
from sleeplm.model.mixer import WindowContext
from sleeplm.model.mlp import MLP
from sleeplm.model.norms import RMSNorm
from sleeplm.model.params import annotated_init, dense, new_parameters


class Block(nn.Module):
    """Pre-norm mixer + residual, then pre-norm MLP + residual. An inserted block (a retrofit's,
    `ModelConfig.inserted_blocks`) is the mixer part alone, and its parameters are declared new."""

    config: Config
    kind: str
    inserted: bool = False

    @nn.compact
    def __call__(self, h: jax.Array, cache: Any, context: WindowContext) -> tuple[jax.Array, Any]:
        model = self.config.model
        norm = lambda name: RMSNorm(model.norm_eps, model.zero_centered_norm, name=name)
        with new_parameters(self.inserted):
            y, cache = mixer_kind(self.kind)(self.config, name=self.kind)(norm("mixer_norm")(h), cache, context)
            h = h + y
            if not self.inserted:
                h = h + MLP(model, name="mlp")(norm("mlp_norm")(h))
        return h, cache


class HybridLM(nn.Module):
    config: Config

    def setup(self) -> None:
        model = self.config.model
        # A gather from a vocab-sharded table would be replicated first: the embedding shards its embed dim only.
        embedding_init = annotated_init(nn.initializers.normal(1.0), (None, "embed"))
        self.embedding = nn.Embed(model.vocab_size, model.d_model, embedding_init=embedding_init)
        self.blocks = [Block(self.config, kind, i in model.inserted_blocks) for i, kind in enumerate(model.layers)]
        self.final_norm = RMSNorm(model.norm_eps, model.zero_centered_norm)
        if not model.tie_embeddings:
            self.head = dense(model.vocab_size, ("embed", "vocab"), hidden_matrix=False)

    def embed(self, tokens: jax.Array) -> jax.Array:
        return self.embedding(tokens).astype(self.config.model.dtype)

    def window_pass(
        self, h: jax.Array, caches: tuple[Any, ...], context: WindowContext, start: int = 0, stop: int | None = None
    ) -> tuple[jax.Array, tuple[Any, ...]]:
        """One pass of blocks [start, stop) (all by default) over window positions pos .. pos + n - 1 (h: (B, n,
        d)); `caches` holds every block's cache, and the others come back unchanged."""
        caches = list(caches)
        for i in range(start, len(self.blocks) if stop is None else stop):
            h, caches[i] = self.blocks[i](h, caches[i], context)
        return h, tuple(caches)

    def logits(self, h: jax.Array) -> jax.Array:
        normed = self.final_norm(h).astype(jnp.float32)
        return self.embedding.attend(normed) if self.config.model.tie_embeddings else self.head(normed)

    def __call__(self, tokens: jax.Array, caches: tuple[Any, ...], context: WindowContext):
        h, caches = self.window_pass(self.embed(tokens), caches, context)
        return self.logits(h), caches
