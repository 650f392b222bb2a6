"""The transformers architectures sleeplm reads and writes, and how each one's `config.json` translates to a
`ModelConfig` and back.

- "llama" (`LlamaForCausalLM`, and other Llama-style attention-only models of model_type "llama"): every block
  the "attn" kind (RoPE over the whole head, GQA), plain RMSNorm.
- "qwen3_next" (`Qwen3NextForCausalLM`) and "qwen3_5" (`Qwen3_5ForCausalLM`, model_type "qwen3_5_text"; or the text
  model inside `Qwen3_5ForConditionalGeneration`, model_type "qwen3_5"): "gated_attn" blocks for
  layer_types "full_attention" and "grouped_gdn" blocks for "linear_attention", zero-centred RMSNorm, partial
  rotary. The two differ only in how the GDN input projections are laid out (`mapping.py`).

Anything the translation cannot represent fails naming the config field and what is allowed: mixture-of-experts
MLPs (`num_experts`), biases, activations other than silu, RoPE scaling.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from sleeplm.config import ModelConfig

HIDDEN_ACT = "silu"


@dataclasses.dataclass(frozen=True)
class Family:
    """One architecture: its name, the transformers class that loads it, its model_type, where its text model's
    tensors live (`prefix`), and tensors its checkpoints may hold that are not the language model (`ignored`:
    name prefix -> what they are)."""

    name: str
    architecture: str
    model_type: str
    prefix: str = "model."
    ignored: tuple[tuple[str, str], ...] = ()


LLAMA = Family("llama", "LlamaForCausalLM", "llama")
QWEN3_NEXT = Family("qwen3_next", "Qwen3NextForCausalLM", "qwen3_next", ignored=(("mtp.", "multi-token prediction"),))
QWEN3_5 = Family("qwen3_5", "Qwen3_5ForCausalLM", "qwen3_5_text", ignored=(("mtp.", "multi-token prediction"),))
QWEN3_5_MULTIMODAL = Family(
    "qwen3_5",
    "Qwen3_5ForConditionalGeneration",
    "qwen3_5",
    prefix="model.language_model.",
    ignored=(("mtp.", "multi-token prediction"), ("model.visual.", "the vision encoder")),
)
FAMILIES = {family.model_type: family for family in (LLAMA, QWEN3_NEXT, QWEN3_5, QWEN3_5_MULTIMODAL)}
QWEN_KINDS = {"linear_attention": "grouped_gdn", "full_attention": "gated_attn"}


def _fail(field: str, value: Any, allowed: str) -> None:
    raise ValueError(f"config.json: {field}={value!r} is not supported: {allowed}")


def family_of(hf: dict) -> Family:
    """The family of a config.json (its model_type), or an error naming model_type and the supported ones."""
    model_type = hf.get("model_type")
    if model_type not in FAMILIES:
        _fail("model_type", model_type, f"supported are {sorted(FAMILIES)} ({sorted(f.architecture for f in _all())})")
    return FAMILIES[model_type]


def _all() -> tuple[Family, ...]:
    return tuple(FAMILIES.values())


def text_config(hf: dict) -> dict:
    """The language model's config (a multimodal config nests it under text_config)."""
    return hf["text_config"] if family_of(hf) is QWEN3_5_MULTIMODAL else hf


def _rope(text: dict) -> tuple[float, float]:
    """(theta, partial rotary factor), from rope_parameters (transformers 5) or the older top-level fields."""
    rope = text.get("rope_parameters") or text.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        _fail("rope_parameters.rope_type", rope_type, "only 'default' RoPE (no scaling) is supported")
    theta = rope.get("rope_theta", text.get("rope_theta", 10_000.0))
    return float(theta), float(rope.get("partial_rotary_factor", text.get("partial_rotary_factor", 1.0)))


def _check_dense(text: dict) -> None:
    """Refuses mixture-of-experts MLPs: sleeplm's blocks have one dense SwiGLU MLP each."""
    experts = text.get("num_experts") or 0
    if experts:
        dense = set(text.get("mlp_only_layers") or [])
        step = text.get("decoder_sparse_step", 1) or 1
        sparse = [i for i in range(text["num_hidden_layers"]) if i not in dense and (i + 1) % step == 0]
        if sparse:
            _fail(
                "num_experts",
                experts,
                f"mixture-of-experts MLPs (layers {sparse[:8]}) are not supported: sleeplm's blocks have one dense "
                "MLP (num_experts=0, or every layer in mlp_only_layers)",
            )


def model_config(hf: dict) -> ModelConfig:
    """The `ModelConfig` of a transformers config.json (as a dict)."""
    family = family_of(hf)
    text = text_config(hf)
    for field, allowed in (("attention_bias", False), ("mlp_bias", False)):
        if text.get(field, False) != allowed:
            _fail(field, text.get(field), "biases are not supported")
    if text.get("hidden_act", HIDDEN_ACT) != HIDDEN_ACT:
        _fail("hidden_act", text.get("hidden_act"), f"only {HIDDEN_ACT!r} is supported")
    _check_dense(text)
    theta, partial = _rope(text)
    heads = text["num_attention_heads"]
    head_dim = text.get("head_dim") or text["hidden_size"] // heads
    common = dict(
        vocab_size=text["vocab_size"],
        d_model=text["hidden_size"],
        num_heads=heads,
        num_kv_heads=text.get("num_key_value_heads") or heads,
        head_dim=head_dim,
        rotary_dim=int(head_dim * partial),
        mlp_dim=text["intermediate_size"],
        rope_theta=theta,
        norm_eps=float(text.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", text.get("tie_word_embeddings", False))),
    )
    if family is LLAMA:
        if partial != 1.0:
            _fail("partial_rotary_factor", partial, "Llama rotates the whole head (1.0)")
        return ModelConfig(layers=("attn",) * text["num_hidden_layers"], **common)
    layer_types = text.get("layer_types") or []
    if len(layer_types) != text["num_hidden_layers"] or not set(layer_types) <= set(QWEN_KINDS):
        _fail("layer_types", layer_types, f"one of {sorted(QWEN_KINDS)} per layer (num_hidden_layers)")
    return ModelConfig(
        layers=tuple(QWEN_KINDS[t] for t in layer_types),
        gdn_heads=text["linear_num_value_heads"],
        gdn_key_heads=text["linear_num_key_heads"],
        gdn_head_dim_k=text["linear_key_head_dim"],
        gdn_head_dim_v=text["linear_value_head_dim"],
        conv_width=text["linear_conv_kernel_dim"],
        short_conv=True,
        zero_centered_norm=True,
        **common,
    )


def family_for_model(model: ModelConfig, base: dict | None) -> Family:
    """The family a `ModelConfig` exports as: the one of the config.json it was converted from when given (the
    text model alone for a multimodal one), else the one its block kinds and norms match; fails naming the field
    that has no transformers counterpart."""
    if model.inserted_blocks:
        raise ValueError(
            f"model.inserted_blocks={model.inserted_blocks} is not exportable: transformers has no architecture with "
            "blocks inserted into a pretrained stack"
        )
    family = family_of(base) if base else None
    kinds = set(model.layers)
    if kinds == {"attn"} and not model.zero_centered_norm and family in (None, LLAMA):
        return LLAMA
    if kinds <= set(QWEN_KINDS.values()) and model.zero_centered_norm and family is not LLAMA:
        return QWEN3_5 if family in (QWEN3_5, QWEN3_5_MULTIMODAL) else QWEN3_NEXT
    raise ValueError(
        f"model.layers={model.layers} (zero_centered_norm={model.zero_centered_norm}) has no transformers "
        "architecture: export supports all-'attn' stacks with plain norms (Llama) and 'gated_attn' / 'grouped_gdn' "
        "stacks with zero-centred norms (Qwen3-Next, Qwen3.5)"
    )


def hf_config(model: ModelConfig, base: dict | None = None) -> dict:
    """The config.json of `model` for transformers: `base` (the config it was converted from; its text model's)
    with every field that `model_config` reads set from `model`, so converting the result gives `model` back."""
    family = family_for_model(model, base)
    hf = dict(text_config(base)) if base else {}
    rope = dict(hf.pop("rope_parameters", None) or {"rope_type": "default"})
    rope["rope_theta"] = model.rope_theta
    for old in ("rope_theta", "rope_scaling", "partial_rotary_factor"):
        hf.pop(old, None)
    hf.update(
        architectures=[family.architecture],
        model_type=family.model_type,
        vocab_size=model.vocab_size,
        hidden_size=model.d_model,
        num_hidden_layers=len(model.layers),
        num_attention_heads=model.num_heads,
        num_key_value_heads=model.num_kv_heads,
        head_dim=model.head_dim,
        intermediate_size=model.mlp_dim,
        rms_norm_eps=model.norm_eps,
        hidden_act=HIDDEN_ACT,
        attention_bias=False,
        tie_word_embeddings=model.tie_embeddings,
        dtype="float32",
        rope_parameters=rope,
    )
    if family is LLAMA:
        hf["mlp_bias"] = False
        return hf
    rope["partial_rotary_factor"] = model.rotary_dim / model.head_dim
    layer_types = {kind: layer_type for layer_type, kind in QWEN_KINDS.items()}
    hf.update(
        layer_types=[layer_types[kind] for kind in model.layers],
        linear_num_value_heads=model.gdn_heads,
        linear_num_key_heads=model.gdn_key_heads,
        linear_key_head_dim=model.gdn_head_dim_k,
        linear_value_head_dim=model.gdn_head_dim_v,
        linear_conv_kernel_dim=model.conv_width,
    )
    if family is QWEN3_NEXT:
        hf.update(num_experts=0, mlp_only_layers=[])
    return hf
