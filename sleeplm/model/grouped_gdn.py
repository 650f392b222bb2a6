"""Grouped Gated DeltaNet, the linear-attention layer of the Qwen3-Next / Qwen3.5 family.

It differs from the "gdn" kind in four ways: queries and keys have `model.gdn_key_heads` heads, each shared by
gdn_heads / gdn_key_heads consecutive value heads (the fast weights S have one state per value head); the causal
short convolution over q, k, v is always on and followed by silu on all three; q and k are L2-normalised and q is
then scaled by d_k^-1/2; the per-head decay and write strength come from a (value-)head projection as in "gdn"
(g = -exp(A_log) softplus(a(x) + dt_bias), beta = sigmoid(b(x))). The output is the silu-gated RMSNorm per value
head (plain scale) and the output projection. Cache and eviction are the "gdn" kind's: S (float32) survives every
window end, the convolution history restarts at every window start; padding (`context.valid` False) changes
neither (g = 0, beta = 0, and the history is taken up to each row's last real token).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from sleeplm.config import Config, ModelConfig
from sleeplm.model.gdn import FastWeightState, GatedDeltaNet, causal_short_conv, gdn_flops_per_token
from sleeplm.model.mixer import WindowContext
from sleeplm.model.norms import l2_normalize
from sleeplm.model.params import dense, param


def conv_channels(model: ModelConfig) -> int:
    """Channels of the short convolution: q and k (key heads), then v (value heads)."""
    return model.gdn_key_heads * 2 * model.gdn_head_dim_k + model.gdn_heads * model.gdn_head_dim_v


class GroupedGatedDeltaNet(GatedDeltaNet):
    @classmethod
    def check_config(cls, model: ModelConfig) -> None:
        if model.gdn_heads % model.gdn_key_heads:
            raise ValueError(
                f"gdn_key_heads={model.gdn_key_heads!r} is invalid: must divide gdn_heads={model.gdn_heads} (each key "
                "head serves a group of value heads)"
            )
        if not model.short_conv:
            raise ValueError("short_conv=False is invalid for the 'grouped_gdn' kind: its convolution is always on")

    @classmethod
    def init_cache(cls, config: Config, batch: int, capacity: int) -> FastWeightState:
        model = config.model
        heads, d_k, d_v = model.gdn_heads, model.gdn_head_dim_k, model.gdn_head_dim_v
        conv = jnp.zeros((batch, model.conv_width - 1, conv_channels(model)), model.dtype)
        return FastWeightState(jnp.zeros((batch, heads, d_k, d_v), jnp.float32), conv)

    @classmethod
    def forward_flops_per_token(cls, config: Config) -> float:
        """The "gdn" kind's count with `gdn_key_heads` query/key heads."""
        return gdn_flops_per_token(config, config.model.gdn_key_heads)

    @classmethod
    def split_sizes(cls, model: ModelConfig) -> dict[str, dict[str, int]]:
        return {"heads": {"model.gdn_heads": model.gdn_heads, "model.gdn_key_heads": model.gdn_key_heads}}

    def queries_keys_values(self, x: jax.Array, state: FastWeightState, context: WindowContext):
        """q and k from `gdn_key_heads` heads, each repeated for its group of value heads; silu after the
        convolution on all three, q scaled by d_k^-1/2."""
        cfg = self.config.model
        batch, length, _ = x.shape
        heads, key_heads, d_k, d_v = cfg.gdn_heads, cfg.gdn_key_heads, cfg.gdn_head_dim_k, cfg.gdn_head_dim_v
        projection = lambda features, name: dense(features, ("embed", "heads"), name, x.dtype)
        qkv = jnp.concatenate(
            [projection(key_heads * d_k, "q")(x), projection(key_heads * d_k, "k")(x), projection(heads * d_v, "v")(x)],
            axis=-1,
        )
        kernel = param(self, "conv", nn.initializers.lecun_normal(), (cfg.conv_width, qkv.shape[-1]), (None, None))
        history = jnp.where(context.pos[:, None, None] > 0, state.conv, 0)  # zero padding at every window start
        qkv, conv = causal_short_conv(qkv, history, kernel, jnp.sum(context.valid, axis=1))
        q, k, v = jnp.split(nn.silu(qkv), [key_heads * d_k, 2 * key_heads * d_k], axis=-1)
        group = heads // key_heads  # value head h reads key head h // group
        q = jnp.repeat(l2_normalize(q.reshape(batch, length, key_heads, d_k)) * d_k**-0.5, group, axis=2)
        k = jnp.repeat(l2_normalize(k.reshape(batch, length, key_heads, d_k)), group, axis=2)
        return q, k, v.reshape(batch, length, heads, d_v), conv
