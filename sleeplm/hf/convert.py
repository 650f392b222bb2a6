"""`sleeplm convert --from-hf DIR --out WORKDIR`: a transformers checkpoint directory (config.json, safetensors
weights, optionally tokenizer.json) to a sleeplm workdir that eval, generate, score and `train --init-from` read:
experiment.json, the parameters as an orbax checkpoint at step 0 (`Checkpoints.save_weights`), the checkpoint's
config.json kept as hf_config.json (export writes it back) and its tokenizer.json.

Every checkpoint tensor must map to sleeplm parameters (`mapping.tensor_rules`) and every parameter must come from
one: a missing or unused tensor, or one of the wrong shape, fails naming it. The workdir is built in a temporary
directory beside it and renamed into place at the end, so a failure writes nothing there. Under a mesh each
parameter is placed shard by shard from the memory-mapped file (`jax.make_array_from_callback`), in the layout
training uses, never whole on one device first.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from sleeplm.config import Config, ModelConfig, SleepConfig
from sleeplm.core.parameters import param_annotations
from sleeplm.experiment.files import TOKENIZER, building
from sleeplm.hf.families import Family, family_of, model_config
from sleeplm.hf.files import CheckpointFiles
from sleeplm.hf.mapping import TensorRule, tensor_rules
from sleeplm.model.params import Annotated


def read_config(directory: Path) -> dict:
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise ValueError(f"{path} does not exist: --from-hf must be a transformers checkpoint directory")
    try:
        return json.loads(path.read_text())
    except ValueError as error:
        raise ValueError(f"{path} is not JSON ({error})") from error


def parameter_shapes(config: Config) -> dict[str, tuple[int, ...]]:
    """{"blocks_0/attn/q/kernel": shape, ...}: every parameter of `config`, by its path below "params"."""
    boxes = jax.tree_util.tree_leaves_with_path(param_annotations(config), is_leaf=lambda x: isinstance(x, Annotated))
    return {"/".join(str(k.key) for k in path[1:]): tuple(box.value.shape) for path, box in boxes}


def checked_rules(files: CheckpointFiles, family: Family, config: Config) -> list[TensorRule]:
    """The tensor rules of `config`, after checking the checkpoint holds exactly their tensors at their shapes
    (tensors of `family.ignored` parts, such as a vision encoder, aside)."""
    shapes = parameter_shapes(config)
    rules = tensor_rules(family, config.model)
    covered = [leaf for rule in rules for leaf in rule.leaves]
    assert sorted(covered) == sorted(shapes), f"the tensor map does not cover {sorted(set(shapes) ^ set(covered))}"
    where = files.directory
    missing = [rule for rule in rules if rule.hf_name not in files.tensors]
    if missing:
        names = ", ".join(rule.hf_name for rule in missing[:5])
        raise ValueError(f"{where}: {len(missing)} tensors of {family.architecture} are missing: {names}")
    known = {rule.hf_name for rule in rules}
    ignored = tuple(prefix for prefix, _ in family.ignored)
    extra = [name for name in files.tensors if name not in known and not name.startswith(ignored)]
    if extra:
        raise ValueError(
            f"{where}: tensor {extra[0]} (in {files.tensors[extra[0]].file.name}) is not part of {family.architecture} "
            f"as config.json describes it ({len(extra)} unused tensors: {extra[:5]})"
        )
    for rule in rules:
        expected = rule.layout.shape(tuple(shapes[leaf] for leaf in rule.leaves))
        actual = files.tensors[rule.hf_name].shape
        if actual != expected:
            raise ValueError(f"{where}: tensor {rule.hf_name} has shape {actual}; config.json implies {expected}")
    return rules


class ParameterReader:
    """Reads sleeplm parameters (float32 numpy) from a checkpoint, one checkpoint tensor at a time (the last one
    read is kept, as a fused tensor holds several parameters)."""

    def __init__(self, files: CheckpointFiles, rules: list[TensorRule]) -> None:
        self.files = files
        self.source = {leaf: (rule, i) for rule in rules for i, leaf in enumerate(rule.leaves)}

    @functools.lru_cache(maxsize=1)  # noqa: B019 (one reader per conversion)
    def _split(self, name: str) -> tuple[np.ndarray, ...]:
        rule = next(rule for rule, _ in self.source.values() if rule.hf_name == name)
        return rule.layout.split(self.files.read(name))

    def leaf(self, path: str) -> np.ndarray:
        rule, index = self.source[path]
        return np.asarray(self._split(rule.hf_name)[index], np.float32)

    def paths(self) -> list[str]:
        return list(self.source)


def nested(flat: dict[str, object]) -> dict:
    """{"a/b": x} -> {"params": {"a": {"b": x}}}."""
    tree: dict = {}
    for path, value in flat.items():
        *parents, name = path.split("/")
        node = tree
        for parent in parents:
            node = node.setdefault(parent, {})
        node[name] = value
    return {"params": tree}


@dataclasses.dataclass(frozen=True)
class Pretrained:
    """A checkpoint directory, read and checked: its config.json, family, model config and parameter reader."""

    directory: Path
    hf: dict
    family: Family
    model: ModelConfig
    reader: ParameterReader

    @classmethod
    def open(cls, directory: Path) -> Pretrained:
        directory = Path(directory)
        hf = read_config(directory)
        family, model = family_of(hf), model_config(hf)
        files = CheckpointFiles(directory)
        return cls(directory, hf, family, model, ParameterReader(files, checked_rules(files, family, Config(model))))

    def params(self) -> dict:
        """Every parameter as a float32 numpy array, in sleeplm's params tree."""
        return nested({path: self.reader.leaf(path) for path in self.reader.paths()})

    def sharded_params(self, shardings: dict) -> dict:
        """Every parameter placed shard by shard with `shardings` (a params tree of shardings)."""

        def place(path, sharding):
            path = "/".join(str(k.key) for k in path[1:])
            shape = self.reader.leaf(path).shape
            return jax.make_array_from_callback(shape, sharding, lambda index: self.reader.leaf(path)[index])

        return jax.tree_util.tree_map_with_path(place, shardings)


def text_task(hf: dict, tokenizer: Path | None, model: ModelConfig, window: int, final: Path):
    """The text task of a converted model: with the checkpoint's own tokenizer (its end-of-text token ends each
    document), or, when it ships none, a byte-level BPE of the model's vocabulary size trained on the corpus."""
    from sleeplm.data.text import TextConfig
    from sleeplm.data.tokenizer import SMALLEST_VOCAB, load_tokenizer

    if tokenizer is None:
        if model.vocab_size >= SMALLEST_VOCAB:  # a byte-level BPE of the model's size can be trained on a corpus
            return TextConfig(vocab_size=model.vocab_size, window=window)
        # No byte-level BPE has so few tokens: the model reads token ids (`generate --ids`, `score --ids-file`)
        # until a tokenizer of its vocabulary is put in the workdir.
        return TextConfig(tokenizer=str(final / TOKENIZER), vocab_size=model.vocab_size, window=window)
    loaded = load_tokenizer(tokenizer, special_tokens=())
    size = loaded.get_vocab_size()
    if size > model.vocab_size:
        raise ValueError(f"{tokenizer} has {size} tokens, more than the model's vocab_size={model.vocab_size}")
    eos = hf.get("eos_token_id")
    eos = eos[0] if isinstance(eos, list) and eos else eos
    if eos is None:
        raise ValueError("config.json: eos_token_id is missing: the text task ends every document with it")
    pad = hf.get("pad_token_id")
    eos_token, pad_token = loaded.id_to_token(int(eos)), loaded.id_to_token(int(eos if pad is None else pad))
    if eos_token is None or pad_token is None:
        raise ValueError(f"config.json: eos_token_id={eos} or pad_token_id={pad} is not a token of {tokenizer}")
    return TextConfig(
        tokenizer=str(final / TOKENIZER), vocab_size=size, eos_token=eos_token, pad_token=pad_token, window=window
    )


def convert(
    hf_dir: Path,
    out: Path,
    sleep: SleepConfig | None = None,
    *,
    mesh: Mesh | None = None,
    rules: str = "fsdp+tp",
    insert_gdn_at: tuple[int, ...] = (),
    insert_kind: str = "gdn",
    seed: int = 0,
) -> Path:
    """Converts the checkpoint in `hf_dir` into the new workdir `out` (see the module docstring); with
    `insert_gdn_at`, retrofits `insert_kind` blocks there (`sleeplm.retrofit`). Returns `out`."""
    from sleeplm.core.parameters import init_params
    from sleeplm.experiment.schema import Experiment
    from sleeplm.experiment.workdir import Workdir
    from sleeplm.training.retrofit import insert_blocks, retrofit_params

    sleep = sleep or SleepConfig(window=1024, eviction="sliding")
    pretrained = Pretrained.open(hf_dir)
    model = pretrained.model
    if insert_gdn_at:
        model = insert_blocks(model, insert_gdn_at, insert_kind)
    config = Config(model, sleep)
    shipped = Path(hf_dir) / TOKENIZER
    final = Path(out).absolute()
    task = text_task(text_hf(pretrained.hf), shipped if shipped.is_file() else None, model, sleep.window, final)
    experiment = Experiment(task, config)
    with building(out) as directory:
        if mesh is None:
            params = jax.tree.map(jnp.asarray, pretrained.params())
            fresh = jax.jit(lambda: init_params(jax.random.key(seed), config))
        else:
            from sleeplm.parallel.mesh import param_shardings

            source = param_shardings(Config(pretrained.model, sleep), mesh, rules)
            params = pretrained.sharded_params(source)
            shardings = param_shardings(config, mesh, rules)
            fresh = jax.jit(lambda: init_params(jax.random.key(seed), config), out_shardings=shardings)
        if insert_gdn_at:
            params = retrofit_params(params, fresh(), model, insert_gdn_at)
        workdir = Workdir(directory)
        workdir.checkpoints().save_weights(params, experiment)
        workdir.write_experiment(experiment)
        workdir.write_hf_config(pretrained.hf)
        if shipped.is_file():
            shutil.copyfile(shipped, workdir.tokenizer_path)
    return final


def text_hf(hf: dict) -> dict:
    """The language model's token ids (eos, pad) of a config.json, looking into a multimodal one's text_config."""
    text = hf.get("text_config") or {}
    return {key: hf.get(key, text.get(key)) for key in ("eos_token_id", "pad_token_id")}
