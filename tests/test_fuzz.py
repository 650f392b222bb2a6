"""Property-based tests (Hypothesis) over the input paths: `--SECTION.FIELD` overrides, an edited experiment.json,
a Hugging Face config.json, and token ids given to `score` and `generate`. The contract each checks: the call works,
or it raises ValueError whose message names the field (or value) and what is allowed. Any other exception (a
TypeError, KeyError, AttributeError, IndexError, an error from inside jax) fails the property.

Examples per property: the "ci" profile (`make test`) by default, ten times more with SLEEPLM_HYPOTHESIS=slow
(`make test-slow`); see tests/conftest.py. The corpus readers are fuzzed in tests/test_fuzz_corpus.py."""

from __future__ import annotations

import copy
import dataclasses
import math

import jax
import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from sleeplm.config import Config, ModelConfig, SleepConfig
from sleeplm.core.checks import check_config
from sleeplm.experiment.overrides import SECTIONS, override_experiment
from sleeplm.experiment.schema import align_task_and_model, experiment_from_json
from sleeplm.hf.families import model_config
from sleeplm.training.presets import PRESETS

CPU_PRESETS = tuple(name for name in PRESETS if name.endswith("-cpu"))


def fails_clearly(call, *names: str):
    """Runs `call()`: returns its result, or None when it raised ValueError naming one of `names` (a field, a value,
    a file). Any other exception propagates, failing the property."""
    try:
        return call()
    except ValueError as error:
        message = str(error)
        assert any(name in message for name in names), f"{message!r} names none of {names}"
        return None


# --- `--SECTION.FIELD VALUE` overrides -----------------------------------------------------------------------------


def _section_fields(preset: str) -> list[tuple[str, str]]:
    experiment = PRESETS[preset]
    keys = []
    for section, path in SECTIONS.items():
        target = experiment
        for attribute in path:
            target = getattr(target, attribute)
        keys += [(section, field.name) for field in dataclasses.fields(target)]
    return keys


OVERRIDE_KEYS = [(preset, section, field) for preset in CPU_PRESETS for section, field in _section_fields(preset)]

override_texts = st.one_of(
    st.integers(-(2**70), 2**70).map(str),
    st.sampled_from(["0", "-1", "1", "2", "3", "7", "16", "1e400", "-0.0"]),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["nan", "inf", "-inf", "NaN", "true", "false", "True", "none", "None", ""]),
    st.lists(st.sampled_from(["attn", "gdn", "0", "2", "-1", "x", "gated_attn", " "]), max_size=4).map(",".join),
    st.sampled_from(["hard", "sliding", "none", "sinks", "sinks:2", "sinks:-1", "sinks:x", "float32", "bfloat16"]),
    st.sampled_from(["all", "new", "auto", "xla", "reference", "replace", "strict", "/nonexistent/*.txt"]),
    st.text(max_size=12),
)


def _override(preset: str, key: str, text: str):
    experiment = align_task_and_model(override_experiment(PRESETS[preset], {key: text}))
    check_config(experiment.config)
    return experiment


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(OVERRIDE_KEYS), override_texts)
@example(("rule110-cpu", "sleep", "eviction"), "x,y")  # a tuple for a str field: no unhashable-type TypeError
@example(("rule110-cpu", "model", "rope_theta"), "nan")
@example(("rule110-cpu", "train", "muon_lr"), "nan")
@example(("rule110-cpu", "train", "weight_decay"), "nan")
@example(("rule110-cpu", "model", "layers"), "attn,x")
@example(("rule110-cpu", "model", "gdn_implementation"), "x")
def test_every_override_works_or_fails_naming_the_field(key, text):
    preset, section, field = key
    # A cross-field check may name the other field and this value (depo: "32^1 names cannot name 33 nodes").
    value = text.strip()
    result = fails_clearly(lambda: _override(preset, f"{section}.{field}", text), field, *([value] if value else []))
    if result is not None:  # an accepted value is one the field's own checks accept again
        assert dataclasses.replace(result.config.model) == result.config.model


@settings(deadline=None)
@given(
    st.sampled_from(CPU_PRESETS), st.one_of(st.sampled_from(list(SECTIONS)), st.text(max_size=10)), st.text(max_size=10)
)
@example("rule110-cpu", "model", "d_modle")
def test_unknown_override_names_fail_naming_them(preset, section, field):
    key = f"{section}.{field}"
    fails_clearly(lambda: _override(preset, key, "1"), key)


# --- an edited experiment.json ---------------------------------------------------------------------------------------


def _leaves(record: dict, prefix=()) -> list[tuple[str, ...]]:
    paths = []
    for key, value in record.items():
        paths.append((*prefix, key))
        if isinstance(value, dict):
            paths += _leaves(value, (*prefix, key))
    return paths


RECORDS = {preset: PRESETS[preset].to_json() for preset in CPU_PRESETS}
JSON_PATHS = [(preset, path) for preset, record in RECORDS.items() for path in _leaves(record)]

json_values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
    st.lists(st.one_of(st.integers(-3, 5), st.text(max_size=4)), max_size=3),
    st.dictionaries(st.text(max_size=4), st.integers(), max_size=2),
)
EDITS = ("delete", "set", "add")


def _edited(preset: str, path: tuple[str, ...], edit: str, value) -> dict:
    record = copy.deepcopy(RECORDS[preset])
    parent = record
    for key in path[:-1]:
        parent = parent[key]
    if edit == "delete":
        del parent[path[-1]]
    elif edit == "set":
        parent[path[-1]] = value
    else:
        parent["unknown_field"] = value
    return record


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(JSON_PATHS), st.sampled_from(EDITS), json_values)
@example(("rule110-cpu", ("config", "model", "d_model")), "delete", None)  # a missing field: no KeyError/TypeError
@example(("rule110-cpu", ("train",)), "add", 1)  # an unknown field: no TypeError
@example(("rule110-cpu", ("task_name",)), "delete", None)
@example(("rule110-cpu", ("config", "model", "rope_theta")), "set", "x")  # no "'>' not supported" TypeError
@example(("rule110-cpu", ("config", "sleep", "remat")), "set", [1])  # a list would make the config unhashable
@example(("rule110-cpu", ("config", "sleep", "eviction")), "set", [1])
@example(("rule110-cpu", ("run", "progress")), "set", {"a": 1})
@example(("rule110-cpu", ("train", "weight_decay")), "set", None)
@example(("rule110-cpu", ("config",)), "set", [])
def test_an_edited_experiment_json_loads_or_fails_naming_the_field(where, edit, value):
    preset, path = where
    record = _edited(preset, path, edit, value)
    names = ("unknown_field",) if edit == "add" else (path[-1],)
    if edit != "add":  # a cross-field check names the value (the default, when deleted) and the other field
        parent = RECORDS[preset]
        for key in path[:-1]:
            parent = parent[key]
        section = PRESETS[preset]
        for key in path[:-1]:
            section = getattr(section, key)
        default = getattr(type(section), path[-1], None) if dataclasses.is_dataclass(section) else None
        values = (parent[path[-1]], value, default)
        names += tuple(str(v) for v in values if isinstance(v, (int, float, str)) and str(v))
    fails_clearly(lambda: experiment_from_json(record), *names, "experiment.json")


# --- a Hugging Face config.json --------------------------------------------------------------------------------------

HF_QWEN = dict(
    model_type="qwen3_next",
    vocab_size=64,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    layer_types=["linear_attention", "full_attention"],
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    linear_num_key_heads=2,
    linear_num_value_heads=4,
    linear_key_head_dim=8,
    linear_value_head_dim=8,
    linear_conv_kernel_dim=4,
    num_experts=0,
    rms_norm_eps=1e-6,
    rope_parameters={"rope_type": "default", "rope_theta": 500.0, "partial_rotary_factor": 0.5},
)
HF_LLAMA = dict(
    model_type="llama",
    vocab_size=64,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    tie_word_embeddings=True,
    rms_norm_eps=1e-5,
    rope_parameters={"rope_type": "default", "rope_theta": 300.0},
)
HF_MULTIMODAL = dict(model_type="qwen3_5", text_config={**HF_QWEN, "model_type": "qwen3_5_text"})
HF_CONFIGS = {"qwen3_next": HF_QWEN, "llama": HF_LLAMA, "qwen3_5": HF_MULTIMODAL}
HF_PATHS = [(name, path) for name, hf in HF_CONFIGS.items() for path in _leaves(hf)]

hf_values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.sampled_from([0, -1, 1, 3, 5, 7]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
    st.lists(st.sampled_from(["linear_attention", "full_attention", "x", 1, None]), max_size=3),
    st.dictionaries(st.sampled_from(["rope_type", "rope_theta", "type", "x"]), st.integers(-1, 3), max_size=2),
)


def _hf_model(hf: dict):
    model = model_config(hf)
    check_config(Config(model, SleepConfig(window=4)))
    return model


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(HF_PATHS), st.sampled_from(("delete", "set")), hf_values)
@example(("llama", ("hidden_size",)), "delete", None)  # a missing field: no KeyError
@example(("llama", ("hidden_size",)), "set", "32")  # a string: no TypeError from //
@example(("llama", ("rope_parameters",)), "set", [1])  # no AttributeError from .get
@example(("llama", ("rms_norm_eps",)), "set", "x")  # float("x"): a ValueError that names nothing
@example(("qwen3_next", ("layer_types",)), "set", 5)  # no TypeError from set(5)
@example(("qwen3_next", ("num_experts",)), "set", "x")
@example(("qwen3_5", ("text_config",)), "delete", None)
@example(("llama", ("num_hidden_layers",)), "set", 2**70)  # no OverflowError or a billion-block tuple
def test_a_hugging_face_config_translates_or_fails_naming_the_field(where, edit, value):
    name, path = where
    hf = copy.deepcopy(HF_CONFIGS[name])
    parent = hf
    for key in path[:-1]:
        parent = parent[key]
    if edit == "delete":
        del parent[path[-1]]
    else:
        parent[path[-1]] = value
    model = fails_clearly(lambda: _hf_model(hf), *path)
    if model is not None:
        assert isinstance(model, ModelConfig)


def test_a_config_json_that_is_not_an_object_fails_naming_it():
    for value in ([], "x", None, 3):
        fails_clearly(lambda value=value: model_config(value), "config.json")


# --- token ids for score and generate --------------------------------------------------------------------------------

VOCAB = 16
WINDOW = 4
FEW = max(1, settings.default.max_examples // 4)  # each example may compile: 10 in "ci", 100 in "slow"


@pytest.fixture(scope="module")
def tiny():
    from sleeplm.core.parameters import init_params

    config = Config(
        ModelConfig(vocab_size=VOCAB, d_model=16, layers=("attn", "gdn"), num_heads=2, gdn_implementation="xla"),
        SleepConfig(window=WINDOW, passes=2),
    )
    return config, init_params(jax.random.key(0), config)


id_values = st.one_of(
    st.integers(0, VOCAB - 1),
    st.sampled_from([-1, VOCAB, -(2**63), 2**63 - 1, 2**31, -(2**31) - 1]),
)
DTYPES = ("int64", "int32", "uint8", "uint64", "float32", "bool")


@st.composite
def id_arrays(draw):
    """Mostly valid (2, 8) int arrays with a few bad ids; sometimes another shape or dtype."""
    shape = draw(st.sampled_from([(2, 8), (2, 8), (2, 8), (1, 8), (8,), (2, 2, 4), (2, 0), (0, 8), ()]))
    dtype = draw(st.sampled_from(DTYPES[:1] * 6 + DTYPES))
    values = np.asarray(draw(st.lists(id_values, min_size=math.prod(shape), max_size=math.prod(shape))), object)
    values = values.reshape(shape)
    if dtype == "bool":
        return np.asarray(values.astype(np.int64) % 2 == 1)
    info = np.iinfo(dtype) if np.dtype(dtype).kind in "iu" else None
    if info is not None:
        values = np.asarray(np.clip(values, info.min, info.max), object)
    return np.asarray(values).astype(dtype)


@settings(deadline=None, max_examples=FEW, suppress_health_check=[HealthCheck.too_slow])
@given(id_arrays())
@example(np.zeros((8,), np.int64))  # 1-d: no IndexError from slicing a second axis
@example(np.zeros((2, 2, 4), np.int64))
@example(np.zeros((), np.int64))
@example(np.full((2, 8), VOCAB, np.int64))
@example(np.zeros((0, 8), np.int64))  # no row: no error from inside jax
def test_score_takes_ids_or_fails_naming_them(tiny, ids):
    from sleeplm.inference.score import score

    config, params = tiny
    result = fails_clearly(lambda: score(params, ids, config), "token", "sequences", "ids")
    if result is not None:
        assert result.tokens == ids.shape[0] * (ids.shape[1] - 1)
        assert np.isfinite(result.mean_nll)


@st.composite
def prompts(draw):
    """Two prompts of 0-5 ids, each an int list or an array of some dtype or shape."""
    rows = []
    for _ in range(2):
        ids = draw(st.lists(id_values, max_size=5))
        form = draw(st.sampled_from(["list", "list", "int64", "float32", "2d", "nested"]))
        if form == "int64":
            ids = np.asarray(ids, np.int64)
        elif form == "float32":
            ids = np.asarray(ids, np.float32)
        elif form == "2d":
            ids = np.asarray(ids, np.int64).reshape(1, -1)
        elif form == "nested":
            ids = [ids, [1]]
        rows.append(ids)
    return rows


@settings(deadline=None, max_examples=FEW, suppress_health_check=[HealthCheck.too_slow])
@given(prompts(), st.sampled_from([(), (1,), (-1,), (VOCAB,), (2**70,), ("x",), (None,), (1.5,)]))
@example([[1, 2], [3]], (None,))  # a stop token None: no TypeError from int(None)
@example([[1, 2], [3]], (1.5,))  # a fractional stop token is not silently truncated
@example([[1, 2], [[1, 2], [1]]], ())  # a ragged nested prompt
def test_generate_takes_prompts_or_fails_naming_them(tiny, rows, stops):
    from sleeplm.inference.generate import generate
    from sleeplm.inference.streams import start_stream

    config, params = tiny
    stream = start_stream(config, 2, jax.random.key(0))
    call = lambda: generate(params, stream, rows, config, max_new_tokens=3, stop_tokens=stops)
    result = fails_clearly(call, "prompt", "stop token", "token id")
    if result is not None:
        assert result.tokens.shape == (2, 3)
        assert ((result.tokens >= -1) & (result.tokens < VOCAB)).all()


@pytest.mark.parametrize("value", ["nan", "-1", "1.5"])
def test_an_arithmetic_reuse_probability_outside_0_1_fails_naming_it(value):
    with pytest.raises(ValueError, match=r"task.reuse_probability=.* is invalid: must be in \[0, 1\]"):
        align_task_and_model(override_experiment(PRESETS["arith-cpu"], {"task.reuse_probability": value}))
