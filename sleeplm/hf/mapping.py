"""The one map between a transformers checkpoint's tensors and sleeplm's parameters, read both ways.

Each `TensorRule` names one checkpoint tensor, the sleeplm parameters it holds (paths below "params", e.g.
"blocks_3/gated_attn/q/kernel") and its `Layout`: how the tensor's rows split into those parameters and join back.
transformers stores a linear layer as (out, in) and sleeplm as (in, out); fused projections hold several sleeplm
kernels, in groups of rows:
- Qwen3-Next / Qwen3.5 `q_proj`: per query head, its query dims then its output-gate dims -> q, gate;
- Qwen3-Next `in_proj_qkvz`: per key head, its q, k, then the v and z (gate) of its group of value heads;
  `in_proj_ba`: per key head, the b then the a of its value heads;
- Qwen3.5 `in_proj_qkv`: all q, then all k, then all v;
- `conv1d.weight` (channels, 1, width) -> (width, channels).
Splitting and joining are views and copies of numpy arrays, so export then convert gives the same bits.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from sleeplm.config import ModelConfig
from sleeplm.hf.families import QWEN3_5, QWEN3_5_MULTIMODAL, Family

Shape = tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class Layout:
    """How one checkpoint tensor holds its sleeplm parameters: `split` (tensor -> parameters), `join` (parameters
    -> tensor) and `shape` (the parameters' shapes -> the tensor's)."""

    split: Callable[[np.ndarray], tuple[np.ndarray, ...]]
    join: Callable[[tuple[np.ndarray, ...]], np.ndarray]
    shape: Callable[[tuple[Shape, ...]], Shape]


def grouped_rows(groups: int, sizes: tuple[int, ...]) -> Layout:
    """A linear weight (out, in) whose rows are `groups` groups, each of parts of `sizes` rows; part i of every
    group, in group order, is the (in, out) kernel of parameter i. A plain linear layer is one group of one part."""
    bounds = np.cumsum(sizes)[:-1]

    def split(weight: np.ndarray) -> tuple[np.ndarray, ...]:
        rows = weight.reshape(groups, sum(sizes), weight.shape[-1])
        return tuple(part.reshape(-1, weight.shape[-1]).T for part in np.split(rows, bounds, axis=1))

    def join(kernels: tuple[np.ndarray, ...]) -> np.ndarray:
        parts = [kernel.T.reshape(groups, size, kernel.shape[0]) for kernel, size in zip(kernels, sizes, strict=True)]
        return np.concatenate(parts, axis=1).reshape(groups * sum(sizes), kernels[0].shape[0])

    return Layout(split, join, lambda shapes: (groups * sum(sizes), shapes[0][0]))


LINEAR = Layout(lambda w: (w.T,), lambda kernels: kernels[0].T, lambda shapes: shapes[0][::-1])
SAME = Layout(lambda x: (x,), lambda values: values[0], lambda shapes: shapes[0])
CONV = Layout(lambda w: (w[:, 0, :].T,), lambda kernels: kernels[0].T[:, None, :], lambda s: (s[0][1], 1, s[0][0]))


@dataclasses.dataclass(frozen=True)
class TensorRule:
    hf_name: str
    leaves: tuple[str, ...]
    layout: Layout


def _block_rules(family: Family, model: ModelConfig, i: int) -> list[tuple[str, tuple[str, ...], Layout]]:
    """(checkpoint name below the layer, sleeplm paths below the block, layout) of block i."""
    kind = model.layers[i]
    rules = [
        ("input_layernorm.weight", ("mixer_norm/scale",), SAME),
        ("post_attention_layernorm.weight", ("mlp_norm/scale",), SAME),
        *((f"mlp.{name}_proj.weight", (f"mlp/{name}/kernel",), LINEAR) for name in ("gate", "up", "down")),
    ]
    if kind == "attn":
        rules += [(f"self_attn.{n}_proj.weight", (f"attn/{n}/kernel",), LINEAR) for n in "qkvo"]
    elif kind == "gated_attn":
        gated_q = grouped_rows(model.num_heads, (model.head_dim, model.head_dim))
        rules += [
            ("self_attn.q_proj.weight", ("gated_attn/q/kernel", "gated_attn/gate/kernel"), gated_q),
            *((f"self_attn.{n}_proj.weight", (f"gated_attn/{n}/kernel",), LINEAR) for n in "kvo"),
            ("self_attn.q_norm.weight", ("gated_attn/q_norm/scale",), SAME),
            ("self_attn.k_norm.weight", ("gated_attn/k_norm/scale",), SAME),
        ]
    elif kind == "grouped_gdn":
        rules += [(f"linear_attn.{name}", (f"grouped_gdn/{leaf}",), layout) for name, leaf, layout in GDN_TENSORS]
        rules += _gdn_projections(family, model)
    else:
        raise ValueError(f"layers[{i}]={kind!r} has no transformers counterpart in {family.architecture}")
    return rules


GDN_TENSORS = (  # the GDN tensors both Qwen layouts share
    ("conv1d.weight", "conv", CONV),
    ("A_log", "A_log", SAME),
    ("dt_bias", "dt_bias", SAME),
    ("norm.weight", "out_norm/scale", SAME),
    ("out_proj.weight", "o/kernel", LINEAR),
)


def _gdn_projections(family: Family, model: ModelConfig) -> list[tuple[str, tuple[str, ...], Layout]]:
    """The GDN input projections: fused per key head (Qwen3-Next), or q, k, v fused and z, b, a apart (Qwen3.5)."""
    key_heads, d_k, d_v = model.gdn_key_heads, model.gdn_head_dim_k, model.gdn_head_dim_v
    group = model.gdn_heads // key_heads
    leaf = lambda *names: tuple(f"grouped_gdn/{name}/kernel" for name in names)
    if family in (QWEN3_5, QWEN3_5_MULTIMODAL):
        qkv = grouped_rows(1, (key_heads * d_k, key_heads * d_k, model.gdn_heads * d_v))
        return [
            ("linear_attn.in_proj_qkv.weight", leaf("q", "k", "v"), qkv),
            ("linear_attn.in_proj_z.weight", leaf("gate"), LINEAR),
            ("linear_attn.in_proj_b.weight", leaf("b"), LINEAR),
            ("linear_attn.in_proj_a.weight", leaf("a"), LINEAR),
        ]
    qkvz = grouped_rows(key_heads, (d_k, d_k, group * d_v, group * d_v))
    return [
        ("linear_attn.in_proj_qkvz.weight", leaf("q", "k", "v", "gate"), qkvz),
        ("linear_attn.in_proj_ba.weight", leaf("b", "a"), grouped_rows(key_heads, (group, group))),
    ]


def tensor_rules(family: Family, model: ModelConfig) -> list[TensorRule]:
    """Every tensor of a `family` checkpoint of `model`, with the sleeplm parameters it holds."""
    prefix = family.prefix
    rules = [
        TensorRule(f"{prefix}embed_tokens.weight", ("embedding/embedding",), SAME),
        TensorRule(f"{prefix}norm.weight", ("final_norm/scale",), SAME),
    ]
    if not model.tie_embeddings:
        rules.append(TensorRule("lm_head.weight", ("head/kernel",), LINEAR))
    for i in range(len(model.layers)):
        for name, leaves, layout in _block_rules(family, model, i):
            rules.append(TensorRule(f"{prefix}layers.{i}.{name}", tuple(f"blocks_{i}/{p}" for p in leaves), layout))
    return rules
