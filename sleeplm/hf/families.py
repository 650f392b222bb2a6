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
import math
import re
from typing import Any

from sleeplm.config import Config, ModelConfig, SleepConfig
from sleeplm.core.checks import check_config

HIDDEN_ACT = "silu"
MAX_LAYERS = 1 << 16
MISSING = object()
# sleeplm's ModelConfig field -> the config.json fields it is translated from (named when a value fails there).
TRANSLATED = {
    "vocab_size": "vocab_size",
    "d_model": "hidden_size",
    "num_heads": "num_attention_heads",
    "num_kv_heads": "num_key_value_heads",
    "head_dim": "head_dim",
    "rotary_dim": "head_dim and partial_rotary_factor",
    "mlp_dim": "intermediate_size",
    "rope_theta": "rope_theta",
    "norm_eps": "rms_norm_eps",
    "gdn_heads": "linear_num_value_heads",
    "gdn_key_heads": "linear_num_key_heads",
    "gdn_head_dim_k": "linear_key_head_dim",
    "gdn_head_dim_v": "linear_value_head_dim",
    "conv_width": "linear_conv_kernel_dim",
    "layers": "layer_types and num_hidden_layers",
}


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
    if not isinstance(hf, dict):
        raise ValueError(f"config.json holds {type(hf).__name__}: it must be a JSON object of the model's fields")
    model_type = hf.get("model_type")
    if not isinstance(model_type, str) or model_type not in FAMILIES:
        _fail("model_type", model_type, f"supported are {sorted(FAMILIES)} ({sorted(f.architecture for f in _all())})")
    return FAMILIES[model_type]


def _all() -> tuple[Family, ...]:
    return tuple(FAMILIES.values())


def text_config(hf: dict) -> dict:
    """The language model's config (a multimodal config nests it under text_config)."""
    if family_of(hf) is not QWEN3_5_MULTIMODAL:
        return hf
    text = hf.get("text_config")
    if not isinstance(text, dict):
        _fail("text_config", text, "a multimodal config nests the language model's fields in the object text_config")
    return text


def _int(text: dict, field: str, default: Any = MISSING, low: int = 1, high: int | None = None) -> Any:
    """The integer `field` of `text` (>= low, <= high); `default` when absent or null (when given)."""
    value = text.get(field)
    if value is None and default is not MISSING:
        return default
    if field not in text:
        raise ValueError(f"config.json: {field} is missing: it must be an integer >= {low}")
    if not isinstance(value, int) or isinstance(value, bool) or value < low or (high is not None and value > high):
        _fail(field, value, f"must be an integer >= {low}" + (f" and <= {high}" if high is not None else ""))
    return value


def _float(mapping: dict, field: str, default: float, name: str | None = None, positive: bool = True) -> float:
    """The finite number `field` of `mapping` (> 0 when `positive`), `default` when absent or null."""
    value = mapping.get(field)
    if value is None:
        return default
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        _fail(name or field, value, "must be a finite number")
    if positive and not value > 0:
        _fail(name or field, value, "must be > 0")
    return float(value)


def _rope(text: dict) -> tuple[float, float]:
    """(theta, partial rotary factor), from rope_parameters (transformers 5) or the older top-level fields."""
    field = "rope_parameters" if text.get("rope_parameters") else "rope_scaling"
    rope = text.get(field) or {}
    if not isinstance(rope, dict):
        _fail(field, rope, "must be an object (rope_type, rope_theta, partial_rotary_factor)")
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        _fail(f"{field}.rope_type", rope_type, "only 'default' RoPE (no scaling) is supported")
    theta = _float(text, "rope_theta", 10_000.0)
    theta = _float(rope, "rope_theta", theta, name=f"{field}.rope_theta")
    partial = _float(text, "partial_rotary_factor", 1.0)
    partial = _float(rope, "partial_rotary_factor", partial, name=f"{field}.partial_rotary_factor")
    if partial > 1:
        _fail("partial_rotary_factor", partial, "must be in (0, 1] (the fraction of each head that RoPE rotates)")
    return theta, partial


def _check_dense(text: dict) -> None:
    """Refuses mixture-of-experts MLPs: sleeplm's blocks have one dense SwiGLU MLP each."""
    experts = _int(text, "num_experts", 0, low=0)
    if experts:
        dense = text.get("mlp_only_layers") or []
        if not isinstance(dense, list):
            _fail("mlp_only_layers", dense, "must be a list of layer indices")
        step = _int(text, "decoder_sparse_step", 1)
        layers = _int(text, "num_hidden_layers", high=MAX_LAYERS)
        sparse = [i for i in range(layers) if i not in dense and (i + 1) % step == 0]
        if sparse:
            _fail(
                "num_experts",
                experts,
                f"mixture-of-experts MLPs (layers {sparse[:8]}) are not supported: sleeplm's blocks have one dense "
                "MLP (num_experts=0, or every layer in mlp_only_layers)",
            )


def model_config(hf: dict) -> ModelConfig:
    """The `ModelConfig` of a transformers config.json (as a dict); a field that is missing, of the wrong type or out
    of range fails naming it (as config.json spells it)."""
    model = _translate(hf)
    try:
        check_config(Config(model, SleepConfig()))
    except ValueError as error:
        raise ValueError(f"config.json: {_named(str(error))}") from None
    return model


def _named(message: str) -> str:
    """A ModelConfig error message with the config.json fields its field is translated from."""
    fields = [field for field in dict.fromkeys(re.findall(r"(\w+)=", message)) if field in TRANSLATED]
    return f"{message} (config.json's {', '.join(TRANSLATED[f] for f in fields)})" if fields else message


def _translate(hf: dict) -> ModelConfig:
    family = family_of(hf)
    text = text_config(hf)
    for field, allowed in (("attention_bias", False), ("mlp_bias", False)):
        if text.get(field, False) != allowed:
            _fail(field, text.get(field), "biases are not supported")
    if text.get("hidden_act", HIDDEN_ACT) != HIDDEN_ACT:
        _fail("hidden_act", text.get("hidden_act"), f"only {HIDDEN_ACT!r} is supported")
    _check_dense(text)
    theta, partial = _rope(text)
    heads = _int(text, "num_attention_heads")
    hidden = _int(text, "hidden_size")
    head_dim = _int(text, "head_dim", 0) or hidden // heads
    if not head_dim:
        _fail("hidden_size", hidden, f"must be at least num_attention_heads={heads} (or set head_dim)")
    rotary_dim = int(head_dim * partial)
    if rotary_dim < 2 or rotary_dim % 2:
        origin = "" if _int(text, "head_dim", 0) else f" (hidden_size={hidden} // num_attention_heads={heads})"
        _fail(
            "partial_rotary_factor",
            partial,
            f"must rotate an even number (>= 2) of the head_dim={head_dim}{origin} dims",
        )
    tie = hf.get("tie_word_embeddings", text.get("tie_word_embeddings", False))
    if not isinstance(tie, bool) and tie is not None:
        _fail("tie_word_embeddings", tie, "must be true or false")
    common = dict(
        vocab_size=_int(text, "vocab_size"),
        d_model=hidden,
        num_heads=heads,
        num_kv_heads=_int(text, "num_key_value_heads", heads),
        head_dim=head_dim,
        rotary_dim=rotary_dim,
        mlp_dim=_int(text, "intermediate_size"),
        rope_theta=theta,
        norm_eps=_float(text, "rms_norm_eps", 1e-6),
        tie_embeddings=bool(tie),
    )
    layers = _int(text, "num_hidden_layers", high=MAX_LAYERS)
    if family is LLAMA:
        if partial != 1.0:
            _fail("partial_rotary_factor", partial, "Llama rotates the whole head (1.0)")
        return ModelConfig(layers=("attn",) * layers, **common)
    layer_types = text.get("layer_types") or []
    if (
        not isinstance(layer_types, list)
        or len(layer_types) != layers
        or not all(isinstance(t, str) and t in QWEN_KINDS for t in layer_types)
    ):
        _fail("layer_types", layer_types, f"one of {sorted(QWEN_KINDS)} per layer (num_hidden_layers)")
    return ModelConfig(
        layers=tuple(QWEN_KINDS[t] for t in layer_types),
        gdn_heads=_int(text, "linear_num_value_heads"),
        gdn_key_heads=_int(text, "linear_num_key_heads"),
        gdn_head_dim_k=_int(text, "linear_key_head_dim"),
        gdn_head_dim_v=_int(text, "linear_value_head_dim"),
        conv_width=_int(text, "linear_conv_kernel_dim"),
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
