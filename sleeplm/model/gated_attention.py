"""Gated attention, the full-attention layer of the Qwen3-Next / Qwen3.5 family: the "attn" kind's windowed
attention (`attention.attend`: window-relative RoPE, KV slots, the previous window under sliding eviction) with
an RMSNorm on each query and key head (zero-centred when `model.zero_centered_norm`), RoPE on the first
`model.rotary_dim` dims of each head (partial rotary), GQA, and a sigmoid output gate per head dim computed from
the block's input: out = o((attention * sigmoid(gate(x)))).
"""

from __future__ import annotations

import flax.linen as nn
import jax

from sleeplm.config import Config
from sleeplm.model.attention import Attention, AttentionCache, attend
from sleeplm.model.mixer import WindowContext
from sleeplm.model.norms import RMSNorm
from sleeplm.model.params import dense


class GatedAttention(Attention):
    """Cache, eviction, cache axes, split sizes and config checks are the "attn" kind's."""

    @classmethod
    def forward_flops_per_token(cls, config: Config) -> float:
        """The "attn" kind's count plus the gate projection (the q/k norms and the gating are elementwise)."""
        m = config.model
        return super().forward_flops_per_token(config) + 2 * m.d_model * m.num_heads * m.head_dim

    @nn.compact
    def __call__(self, x: jax.Array, cache: AttentionCache, context: WindowContext) -> tuple[jax.Array, AttentionCache]:
        cfg = self.config.model
        q, k, v = self.queries_keys_values(x)
        gate = dense(cfg.num_heads * cfg.head_dim, ("embed", "heads"), "gate", x.dtype)(x)
        head_norm = lambda name: RMSNorm(cfg.norm_eps, cfg.zero_centered_norm, name=name)
        out, cache = attend(head_norm("q_norm")(q), head_norm("k_norm")(k), v, cache, context, self.config)
        out = out * jax.nn.sigmoid(gate.astype(out.dtype))
        return dense(cfg.d_model, ("heads", "embed"), "o", x.dtype)(out), cache
