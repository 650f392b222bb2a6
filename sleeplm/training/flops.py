"""Model FLOPs of a training step, counted analytically (XLA's cost analysis does not multiply `lax.scan` bodies by
their trip count). Only useful work counts: N passes over each slept window (full, and followed by more of its
document), one pass over every other real token, 2 FLOPs per multiply-add, and training = 3x forward. Padding is
real compute but not counted. Each mixer kind reports its own cost (`Mixer.forward_flops_per_token`; attention
counts its scores over the keys the eviction mode shows a query, `Eviction.attended_keys`).
"""

from __future__ import annotations

import numpy as np

from sleeplm.config import Config
from sleeplm.model.kinds import mixer_kind


def forward_flops_per_token_pass(config: Config) -> float:
    """FLOPs of one block-stack pass for one token (2 per multiply-add): each block's mixer, as its kind counts
    it, and the MLP of every block that has one (a retrofit's inserted blocks have none); nothing for the head."""
    m = config.model
    mlp = 2 * 3 * m.d_model * m.mlp_dim
    return sum(
        mixer_kind(kind).forward_flops_per_token(config) + (0 if i in m.inserted_blocks else mlp)
        for i, kind in enumerate(m.layers)
    )


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
