"""Extension points that hold: a mixer kind reports its own FLOPs (one defined here, outside the package, is
counted by `train_flops`; the Qwen3-Next kinds are counted by hand), and no module of the package switches on a
mixer-kind or eviction-mode name outside the module that defines it.

What each extension touches in the package, as measured (the tests named prove the "from outside" rows):

- a mixer kind: 0 package files when registered from outside (`register_mixer`; tests/test_kinds.py and
  `test_a_kind_defined_here_reports_its_own_flops` below), or 1 module + 1 registry line in model/kinds.py;
- a task: 0 package files when registered from outside (`register_task`; tests/test_kinds.py), or 1 module + 1
  `register_task` line in data/__init__.py;
- an eviction mode: 0 package files when registered from outside (`register_eviction`; tests/test_eviction.py,
  `test_a_mode_registered_outside_the_package_works_end_to_end`); the attention-sinks mode is its module
  (eviction/sinks.py) + 1 registry entry in eviction/__init__.py (its import and its `register_eviction` line),
  checked by `test_the_sinks_mode_is_its_module_and_one_registry_entry`.
"""

from __future__ import annotations

import ast
import dataclasses
import pathlib

import numpy as np
import pytest
from test_kinds import ExponentialMixer

from sleeplm import Config, ModelConfig, SleepConfig
from sleeplm.eviction import EVICTIONS
from sleeplm.model.kinds import MIXERS, register_mixer
from sleeplm.training.flops import forward_flops_per_token_pass, train_flops

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "sleeplm"
SLEEP = SleepConfig(window=8, passes=3, eviction="sliding")
MODEL = ModelConfig(vocab_size=16, d_model=32, num_heads=4, num_kv_heads=2, mlp_dim=64, gdn_chunk_size=4)


class CountedMixer(ExponentialMixer):
    """The test's own kind (tests/test_kinds.py's running mean) with its own cost: two projections."""

    @classmethod
    def forward_flops_per_token(cls, config: Config) -> float:
        m = config.model
        return 2 * (2 * m.d_model * m.num_heads * m.head_dim)


def attention_flops(m: ModelConfig, attended: int) -> float:
    width, kv_width = m.num_heads * m.head_dim, m.num_kv_heads * m.head_dim
    return 2 * m.d_model * (2 * width + 2 * kv_width) + 4 * attended * width


def gdn_flops(m: ModelConfig, key_heads: int, window: int) -> float:
    heads, d_k, d_v, chunk = m.gdn_heads, m.gdn_head_dim_k, m.gdn_head_dim_v, min(m.gdn_chunk_size, window)
    projections = 2 * m.d_model * (2 * key_heads * d_k + 2 * heads * d_v + 2 * heads) + 2 * heads * d_v * m.d_model
    return projections + 2 * heads * (chunk * (3 * d_k + 2 * d_v) + 3 * d_k * d_v)


def test_a_kind_defined_here_reports_its_own_flops():
    register_mixer("counted", CountedMixer)
    try:
        config = Config(dataclasses.replace(MODEL, layers=("attn", "counted"), inserted_blocks=(1,)), SLEEP)
        mlp = 2 * 3 * MODEL.d_model * MODEL.mlp_dim
        own = 2 * (2 * MODEL.d_model * MODEL.num_heads * MODEL.head_dim)
        expected = attention_flops(config.model, 2 * SLEEP.window) + mlp + own  # the inserted block has no MLP
        assert forward_flops_per_token_pass(config) == expected
        batch = {"inputs": np.zeros((2, 3 * SLEEP.window), np.int32)}
        slept_tokens = 2 * 2 * SLEEP.window * (SLEEP.passes - 1)  # two windows of each row are followed
        head = 2 * MODEL.d_model * MODEL.vocab_size * batch["inputs"].size
        assert train_flops(config, batch) == 3 * ((batch["inputs"].size + slept_tokens) * expected + head)
    finally:
        MIXERS.pop("counted")


def test_the_qwen3_next_kinds_are_counted_by_hand():
    model = dataclasses.replace(MODEL, layers=("gated_attn", "grouped_gdn", "attn", "gdn"), gdn_key_heads=2)
    mlp = 2 * 3 * model.d_model * model.mlp_dim
    gate = 2 * model.d_model * model.num_heads * model.head_dim
    for eviction, attended in (("sliding", 16), ("hard", 8), ("none", 8), ("sinks:3", 19)):
        config = Config(model, dataclasses.replace(SLEEP, eviction=eviction))
        expected = (
            2 * attention_flops(model, attended)
            + gate
            + gdn_flops(model, 2, SLEEP.window)
            + gdn_flops(model, model.gdn_heads, SLEEP.window)
            + 4 * mlp
        )
        assert forward_flops_per_token_pass(config) == expected


def _names_switched_on(tree: ast.AST, names: set[str]) -> list[tuple[int, str]]:
    """(line, name) of each string constant among `names` compared with (==, !=, in, not in, is), used as a dict
    key, or used as a subscript."""

    def constants(node):
        if isinstance(node, ast.Constant) and node.value in names:
            yield node
        elif isinstance(node, (ast.Tuple, ast.List, ast.Set)):  # `kind in ("attn", "gated_attn")`
            for element in node.elts:
                yield from constants(element)

    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
        elif isinstance(node, ast.Dict):
            operands = [key for key in node.keys if key is not None]
        elif isinstance(node, ast.Subscript):
            operands = [node.slice]
        else:
            continue
        found += [(c.lineno, c.value) for operand in operands for c in constants(operand)]
    return found


# Where names may be switched on: the registries, the modules that define each kind or mode, and the Hugging Face
# mapping (sleeplm/hf/ maps Hugging Face layer types onto kind names: that mapping is its job).
ALLOWED = {"model/kinds.py", "eviction/__init__.py", "eviction/modes.py", "eviction/sinks.py"}
ALLOWED |= {"model/attention.py", "model/gated_attention.py", "model/gdn.py", "model/grouped_gdn.py"}
ALLOWED_DIRECTORIES = ("hf/",)
# Constants that only spell the same word: the command line's "none" for Python's None in a field override.
UNRELATED = {("experiment/overrides.py", "none")}


def test_no_module_switches_on_a_kind_or_mode_name():
    """No module outside the definitions compares with, keys a dict by or subscripts with a registered mixer-kind
    or eviction-mode name (default values of config fields, presets and docstrings are allowed: they name, they do
    not switch). sleeplm/hf/ is exempt: it is the Hugging Face mapping from HF layer types to kind names; so is the
    override parser's "none" (Python's None on the command line, not the eviction mode)."""
    names = {"attn", "gdn", "gated_attn", "grouped_gdn", "hard", "sliding", "none", "sinks"}
    assert names <= set(MIXERS) | set(EVICTIONS)
    violations = []
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE).as_posix()
        if relative in ALLOWED or relative.startswith(ALLOWED_DIRECTORIES):
            continue
        for line, name in _names_switched_on(ast.parse(path.read_text()), names):
            if (relative, name) not in UNRELATED:
                violations.append(f"sleeplm/{relative}:{line}: {name!r}")
    assert not violations, "modules switch on kind or mode names:\n" + "\n".join(violations)


def test_the_guard_sees_a_switch():
    """The check above finds each form it looks for."""
    source = 'if kind == "attn": pass\nx = {"gdn": 1}\ny = table["sliding"]\nz = mode in ("hard", "none")\n'
    assert sorted(name for _, name in _names_switched_on(ast.parse(source), {"attn", "gdn", "sliding", "hard"})) == [
        "attn",
        "gdn",
        "hard",
        "sliding",
    ]


def test_the_sinks_mode_is_its_module_and_one_registry_entry():
    mentions = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        lines = [n for n, text in enumerate(path.read_text().splitlines(), 1) if "Sinks" in text or ".sinks" in text]
        if lines:
            mentions[path.relative_to(PACKAGE).as_posix()] = lines
    assert set(mentions) == {"eviction/sinks.py", "eviction/__init__.py"}, mentions
    registry = (PACKAGE / "eviction/__init__.py").read_text().splitlines()
    assert [registry[n - 1] for n in mentions["eviction/__init__.py"]] == [
        "from sleeplm.eviction.sinks import Sinks",
        "register_eviction(Sinks())",
    ]


@pytest.mark.parametrize("kind", sorted(("attn", "gdn", "gated_attn", "grouped_gdn")))
def test_every_built_in_kind_reports_its_flops(kind):
    config = Config(dataclasses.replace(MODEL, layers=(kind,), gdn_key_heads=2), SLEEP)
    assert MIXERS[kind].forward_flops_per_token(config) > 0
