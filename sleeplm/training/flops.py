"""Model FLOPs of a training step, counted analytically (XLA's cost analysis does not multiply `lax.scan` bodies by
their trip count). Only useful work counts: N passes over each slept window (full, and followed by more of its
document), one pass over every other real token, 2 FLOPs per multiply-add, and training = 3x forward. Padding is
real compute but not counted; attention scores are counted over one window (two with sliding eviction), also
without eviction.
"""

from __future__ import annotations

import numpy as np

from sleeplm.config import Config


def forward_flops_per_token_pass(config: Config) -> float:
    """FLOPs of one block-stack pass for one token (2 per multiply-add), plus nothing for the head."""
    m, window = config.model, config.sleep.window
    d, attended = m.d_model, window * (2 if config.sleep.eviction == "sliding" else 1)
    attn_width, kv_width = m.num_heads * m.head_dim, m.num_kv_heads * m.head_dim
    heads, d_k, d_v = m.gdn_heads, m.gdn_head_dim_k, m.gdn_head_dim_v
    chunk = min(m.gdn_chunk_size, window)
    attention = 2 * d * (2 * attn_width + 2 * kv_width) + 4 * attended * attn_width
    gdn_projections = 2 * d * (2 * heads * d_k + 2 * heads * d_v + 2 * heads) + 2 * heads * d_v * d
    gdn_rule = 2 * heads * (chunk * (3 * d_k + 2 * d_v) + 3 * d_k * d_v)
    mlp = 2 * 3 * d * m.mlp_dim
    per_layer = {"attn": attention, "gdn": gdn_projections + gdn_rule}
    return sum(per_layer[kind] + mlp for kind in m.layers)


def train_flops(config: Config, batch: dict) -> float:
    """Model FLOPs of one training step on `batch` (its real tokens; packed rows' documents counted as they are)."""
    window, passes = config.sleep.window, config.sleep.passes
    inputs = np.asarray(batch["inputs"])
    valid = np.asarray(batch.get("valid", np.ones(inputs.shape, bool)))
    starts = np.asarray(batch.get("document_start", np.zeros(inputs.shape, bool)))
    following = np.arange(window, inputs.shape[1], window)  # each window's successor's first position
    slept = valid[:, following] & ~starts[:, following]  # a full window followed by more of its document
    if config.sleep.eviction_mode.bounded:
        token_passes = valid.sum() + slept.sum() * window * (passes - 1)
    else:
        token_passes = valid.sum()
    head = 2 * config.model.d_model * config.model.vocab_size * valid.sum()
    return float(3 * (token_passes * forward_flops_per_token_pass(config) + head))
