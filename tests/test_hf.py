"""Pretrained Hugging Face models against `transformers` itself: tiny random Qwen3-Next, Qwen3.5 and Llama
checkpoints (every parameter moved off its initialisation) convert to sleeplm with the same logits as the PyTorch
models; every tensor maps and exports back bit for bit; the new kinds stream, sleep and pack like the core's;
a converted checkpoint fine-tunes with sleep and resumes bitwise; retrofitting keeps the function and trains only
the new blocks; bad checkpoints fail naming the tensor or field, writing nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from fake_devices import fake_cpu_devices  # noqa: E402
from safetensors.numpy import load_file, save_file  # noqa: E402
from test_packing import ROW_LENGTH, pack  # noqa: E402
from test_sleep import WINDOW  # noqa: E402

from sleeplm import Config, ModelConfig, SleepConfig, forward, init_state, wake_step  # noqa: E402
from sleeplm.cli.main import main as cli_main  # noqa: E402
from sleeplm.core.checks import check_config  # noqa: E402
from sleeplm.core.parameters import init_params, param_annotations  # noqa: E402
from sleeplm.experiment.schema import TrainConfig, experiment_from_json  # noqa: E402
from sleeplm.hf.convert import Pretrained, convert  # noqa: E402
from sleeplm.hf.export import export  # noqa: E402
from sleeplm.training.checkpoint import Checkpointer  # noqa: E402
from sleeplm.training.optimizer import make_optimizer  # noqa: E402
from sleeplm.training.retrofit import insert_blocks, retrofit_params  # noqa: E402
from sleeplm.training.step import TrainState, train_step  # noqa: E402

VOCAB = 272  # the model's (padded) vocabulary; the test tokenizer has 270 tokens
EOS = "<|endoftext|>"
QWEN = dict(
    vocab_size=VOCAB,
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
    eos_token_id=1,
    rope_parameters={"rope_type": "default", "rope_theta": 500.0, "partial_rotary_factor": 0.5},
)
LLAMA = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    tie_word_embeddings=True,
    eos_token_id=1,
    rms_norm_eps=1e-5,
    rope_parameters={"rope_type": "default", "rope_theta": 300.0},
)


def hf_model(family: str):
    """A tiny random transformers model of `family`, every parameter (norms, A_log, dt_bias included) moved off its
    initialisation, in float32 eval mode."""
    torch.manual_seed({"qwen3_next": 0, "qwen3_5": 1, "llama": 2}[family])
    if family == "qwen3_next":
        model = transformers.Qwen3NextForCausalLM(transformers.Qwen3NextConfig(**QWEN, num_experts=0))
    elif family == "qwen3_5":
        model = transformers.Qwen3_5ForCausalLM(transformers.Qwen3_5TextConfig(**QWEN, tie_word_embeddings=True))
    else:
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA))
    with torch.no_grad():
        for parameter in model.parameters():
            spread = parameter.std() if parameter.numel() > 1 and parameter.std() > 0 else torch.tensor(1.0)
            parameter.add_(0.5 * spread * torch.randn_like(parameter))
    return model.float().eval()


def write_tokenizer(path: Path) -> None:
    """A byte-level BPE of 270 tokens whose only special token is named as Qwen's is (id 1 as config.json says)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=270,
        special_tokens=["<pad>", EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(["the cat sat on the mat " * 20, "a dog ran far away " * 20], trainer)
    tokenizer.save(str(path))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """{family: (directory, torch model)}, each saved as one safetensors file with a tokenizer."""
    saved = {}
    for family in ("qwen3_next", "qwen3_5", "llama"):
        directory = tmp_path_factory.mktemp(family)
        model = hf_model(family)
        model.save_pretrained(directory, safe_serialization=True)
        write_tokenizer(directory / "tokenizer.json")
        saved[family] = (directory, model)
    return saved


def relative_error(actual, expected) -> float:
    return float(np.max(np.abs(np.asarray(actual) - expected)) / np.max(np.abs(expected)))


TOKENS = np.random.default_rng(0).integers(0, VOCAB, (2, 21))


def torch_logits(model, tokens=TOKENS) -> np.ndarray:
    with torch.no_grad():
        return model(torch.as_tensor(tokens)).logits.numpy()


def no_eviction(model: ModelConfig) -> Config:
    return Config(model, SleepConfig(window=8, passes=1, eviction="none"))


@pytest.mark.parametrize("family", ["qwen3_next", "qwen3_5", "llama"])
def test_converted_logits_equal_transformers(checkpoints, family):
    directory, model = checkpoints[family]
    pretrained = Pretrained.open(directory)
    ours = forward(pretrained.params(), jnp.asarray(TOKENS), no_eviction(pretrained.model))
    error = relative_error(ours, torch_logits(model))
    print(f"{family}: max |sleeplm - transformers| / max |transformers| = {error:.2e}")
    assert error < 1e-4
    expected_kinds = {"llama": {"attn"}}.get(family, {"gated_attn", "grouped_gdn"})
    assert set(pretrained.model.layers) == expected_kinds


@pytest.mark.parametrize("family", ["qwen3_next", "llama"])
def test_export_then_convert_is_bit_for_bit_and_transformers_loads_it(checkpoints, family, tmp_path):
    directory, model = checkpoints[family]
    workdir = convert(directory, tmp_path / "converted")
    assert json.loads((workdir / "experiment.json").read_text())["task"]["eos_token"] == EOS
    exported = export(workdir, tmp_path / "exported")
    original, again = load_file(directory / "model.safetensors"), load_file(exported / "model.safetensors")
    assert sorted(again) == sorted(original)  # every tensor mapped: none left unused, none missing
    for name, tensor in original.items():
        np.testing.assert_array_equal(again[name], tensor, err_msg=name)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(exported, dtype=torch.float32).eval()
    np.testing.assert_array_equal(torch_logits(reloaded), torch_logits(model))
    assert (exported / "tokenizer.json").read_bytes() == (directory / "tokenizer.json").read_bytes()


def test_a_sharded_checkpoint_converts_like_a_single_file(checkpoints, tmp_path):
    directory, model = checkpoints["qwen3_next"]
    model.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").is_file() and len(list(tmp_path.glob("*.safetensors"))) > 2
    sharded, single = Pretrained.open(tmp_path).params(), Pretrained.open(directory).params()
    jax.tree.map(np.testing.assert_array_equal, sharded, single)


def converted(checkpoints, family: str, sleep: SleepConfig):
    pretrained = Pretrained.open(checkpoints[family][0])
    return jax.tree.map(jnp.asarray, pretrained.params()), Config(pretrained.model, sleep)


@pytest.mark.parametrize("eviction", ["hard", "sliding"])
def test_the_new_kinds_stream_and_sleep_like_forward(checkpoints, eviction):
    params, config = converted(checkpoints, "qwen3_next", SleepConfig(window=4, passes=2, eviction=eviction))
    tokens = jnp.asarray(TOKENS[:, :12])
    expected = forward(params, tokens, config)
    state, pieces = init_state(config, 2), []
    for t in range(0, 12, 3):  # pieces that cross window boundaries: wake_step sleeps on each full window itself
        logits, state = wake_step(params, state, tokens[:, t : t + 3], config)
        pieces.append(logits)
    assert relative_error(jnp.concatenate(pieces, axis=1), np.asarray(expected)) < 1e-4
    if eviction == "hard":  # the control: the sleep passes do change the model
        no_sleep = forward(params, tokens, Config(config.model, SleepConfig(window=4, passes=1, eviction=eviction)))
        assert relative_error(no_sleep[:, 4:], np.asarray(expected[:, 4:])) > 1e-3


def test_the_new_kinds_give_packed_documents_what_they_get_alone(checkpoints):
    params, config = converted(checkpoints, "qwen3_next", SleepConfig(window=WINDOW, passes=2, eviction="sliding"))
    rng = np.random.default_rng(5)
    rows = [[3, WINDOW + 2], [WINDOW + 2, 3]]  # document input lengths: within a window and across one
    documents = [[rng.integers(0, VOCAB, n + 1) for n in row] for row in rows]
    packed = pack(documents)
    assert packed["inputs"].shape[1] == ROW_LENGTH
    logits = forward(
        params, jnp.asarray(packed["inputs"]), config, valid=packed["valid"], document_start=packed["document_start"]
    )
    for row, docs in enumerate(documents):
        at = 0
        for doc in docs:
            n = len(doc) - 1
            alone = forward(params, jnp.asarray(doc[None, :-1]), config)[0]
            np.testing.assert_allclose(logits[row, at : at + n], alone, rtol=1e-5, atol=1e-5)
            at += -(-n // WINDOW) * WINDOW


def write_corpus(directory: Path, documents: int = 80) -> None:
    rng = np.random.default_rng(7)
    words = ["the", "cat", "sat", "on", "mat", "a", "dog", "ran", "far", "away"]
    directory.mkdir()
    for i in range(documents):
        (directory / f"doc{i}.txt").write_text(" ".join(rng.choice(words, 40)))


def fine_tune(workdir: Path, start: Path, corpus: Path, *extra: str) -> None:
    settings = {
        "task.files": f"{corpus}/*.txt",
        "task.exclude": "",
        "task.cache_dir": str(corpus.parent / "cache"),
        "task.windows": "2",
        "sleep.window": "8",
        "sleep.passes": "2",
        "train.steps": "4",
        "train.batch_size": "4",
        "train.warmup_steps": "1",
        "train.muon_lr": "0.01",
        "train.adam_lr": "0.01",
        "run.eval_every": "4",
        "run.eval_examples": "4",
        "run.eval_batch_size": "4",
        "run.checkpoint_every": "2",
        "run.log_every": "1",
        "run.progress": "false",
    }
    options = [f"--{key}={value}" for key, value in settings.items()]
    cli_main(["train", "--preset", "lm-cpu", "--workdir", str(workdir), "--init-from", str(start), *options, *extra])


@pytest.mark.slow  # trains: ~50 s
def test_a_converted_checkpoint_fine_tunes_with_sleep_and_resumes_bitwise(checkpoints, tmp_path, capsys):
    start = convert(checkpoints["qwen3_5"][0], tmp_path / "converted")
    write_corpus(tmp_path / "corpus")
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    fine_tune(straight, start, tmp_path / "corpus")
    fine_tune(resumed, start, tmp_path / "corpus", "--stop-at", "2")
    fine_tune(resumed, start, tmp_path / "corpus")  # resumes its own step 2, not the pretrained start
    metrics = lambda run: [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    records = metrics(straight)
    train_losses = [r["loss"] for r in records if r["kind"] == "train"]
    assert len(train_losses) == 4 and train_losses[-1] < train_losses[0]
    wall_clock = ("seconds", "timed_from_step")  # the only fields that may differ: when each record was written
    assert [{k: v for k, v in r.items() if k not in wall_clock} for r in metrics(resumed)] == [
        {k: v for k, v in r.items() if k not in wall_clock} for r in records
    ]
    experiment = experiment_from_json(json.loads((straight / "experiment.json").read_text()))
    assert experiment.config.sleep.passes == 2 and experiment.config.model.tie_embeddings
    assert (straight / "tokenizer.json").read_bytes() == (start / "tokenizer.json").read_bytes()
    final = [Checkpointer(run / "checkpoints", keep=2).restore_params(experiment)[0] for run in (straight, resumed)]
    jax.tree.map(np.testing.assert_array_equal, *final)
    capsys.readouterr()
    cli_main(["generate", "--workdir", str(straight), "--prompt", "the cat", "--max-new-tokens", "3"])
    assert len(json.loads(capsys.readouterr().out.splitlines()[-1])["ids"]) == 3


@pytest.mark.slow  # trains: ~40 s
def test_retrofit_keeps_the_function_and_trains_only_the_new_blocks(checkpoints, tmp_path):
    directory, model = checkpoints["llama"]
    pretrained = Pretrained.open(directory)
    workdir = convert(directory, tmp_path / "retrofitted", insert_gdn_at=(1, 2))
    experiment = experiment_from_json(json.loads((workdir / "experiment.json").read_text()))
    retrofitted = experiment.config.model
    assert retrofitted.layers == ("attn", "gdn", "attn", "gdn") and retrofitted.inserted_blocks == (1, 3)
    params, _ = Checkpointer(workdir / "checkpoints", keep=1).restore_params(experiment)
    before = forward(jax.tree.map(jnp.asarray, pretrained.params()), jnp.asarray(TOKENS), no_eviction(pretrained.model))
    after = forward(params, jnp.asarray(TOKENS), no_eviction(retrofitted))
    np.testing.assert_array_equal(after, before)  # a silenced block adds exactly zero
    assert relative_error(after, torch_logits(model)) < 1e-4

    config = Config(retrofitted, SleepConfig(window=7, passes=1, eviction="hard"))
    train = TrainConfig(steps=4, batch_size=2, warmup_steps=1, trainable="new", weight_decay=0.1)
    state = TrainState(params, make_optimizer(train, config).init(params), jnp.zeros((), jnp.int32))
    state = jax.device_put(state, jax.devices()[0])  # committed like the step's outputs: one compilation
    batch = {"inputs": jnp.asarray(TOKENS[:, :-1]), "targets": jnp.asarray(TOKENS[:, 1:])}
    batch["loss_mask"] = jnp.ones(batch["targets"].shape)
    new = jax.tree.map(lambda box: box.new, param_annotations(config), is_leaf=lambda x: hasattr(x, "new"))
    for _ in range(2):  # the first step moves the zero output projections, the second the rest of the new blocks
        previous = state.params
        state, _ = train_step(jax.tree.map(jnp.copy, state), batch, config, train)
    changed = jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))), state.params, params)
    assert jax.tree.leaves(changed) == jax.tree.leaves(new)  # exactly the new parameters moved
    moved_last = jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))), state.params, previous)
    assert jax.tree.leaves(moved_last) == jax.tree.leaves(new)
    names = {jax.tree_util.keystr(path) for path, is_new in jax.tree_util.tree_leaves_with_path(new) if is_new}
    assert names and all("blocks_1" in n or "blocks_3" in n for n in names)

    # The same retrofit at fine-tuning time, from the plain converted model, gives the same starting parameters.
    plain = convert(directory, tmp_path / "plain")
    from sleeplm.training.finetune import PretrainedStart

    source = experiment_from_json(json.loads((plain / "experiment.json").read_text()))
    fresh = init_params(jax.random.key(0), config)
    started = PretrainedStart(plain, source, retrofitted, (1, 2)).params(fresh)
    np.testing.assert_array_equal(forward(started, jnp.asarray(TOKENS), no_eviction(retrofitted)), before)
    assert insert_blocks(pretrained.model, (1, 2)) == retrofitted
    at_convert = retrofit_params(pretrained.params(), fresh, retrofitted, (1, 2))
    jax.tree.map(np.testing.assert_array_equal, at_convert, started)


def rewrite(directory: Path, change) -> None:
    """Applies `change` to the checkpoint's {name: tensor} and writes it back."""
    path = directory / "model.safetensors"
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


def edit_config(directory: Path, **fields) -> None:
    path = directory / "config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | fields))


BAD_INPUTS = {
    "missing tensor": (
        lambda d: rewrite(d, lambda t: t.pop("model.layers.1.self_attn.q_norm.weight")),
        r"missing: model\.layers\.1\.self_attn\.q_norm\.weight",
    ),
    "extra tensor": (
        lambda d: rewrite(d, lambda t: t.update({"model.layers.0.linear_attn.extra.weight": np.zeros(3, np.float32)})),
        r"tensor model\.layers\.0\.linear_attn\.extra\.weight \(in model\.safetensors\) is not part of",
    ),
    "shape mismatch": (
        lambda d: rewrite(d, lambda t: t.update({"model.layers.0.linear_attn.A_log": np.zeros(5, np.float32)})),
        r"tensor model\.layers\.0\.linear_attn\.A_log has shape \(5,\); config\.json implies \(4,\)",
    ),
    "unsupported architecture": (
        lambda d: edit_config(d, model_type="mixtral"),
        r"model_type='mixtral' is not supported: supported are",
    ),
    "mixture of experts": (
        lambda d: edit_config(d, num_experts=4, mlp_only_layers=[0]),
        r"num_experts=4 is not supported: mixture-of-experts MLPs \(layers \[1\]\)",
    ),
    "corrupt safetensors": (
        lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:1000]),
        r"safetensors file .*model\.safetensors is unreadable",
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_checkpoints_fail_naming_the_tensor_or_field_and_write_nothing(checkpoints, tmp_path, case):
    breaks, message = BAD_INPUTS[case]
    directory = tmp_path / "checkpoint"
    directory.mkdir()
    source = checkpoints["qwen3_next"][0]
    for name in ("config.json", "model.safetensors"):
        (directory / name).write_bytes((source / name).read_bytes())
    breaks(directory)
    out = tmp_path / "out" / "workdir"
    out.parent.mkdir()
    with pytest.raises(ValueError, match=message):
        convert(directory, out)
    assert not out.exists() and list((tmp_path / "out").iterdir()) == []


def test_config_fields_are_validated_naming_the_field():
    with pytest.raises(ValueError, match=r"rotary_dim=5 is invalid: must be even and at most head_dim=8"):
        check_config(Config(ModelConfig(d_model=32, num_heads=4, rotary_dim=5)))
    with pytest.raises(ValueError, match=r"gdn_key_heads=3 is invalid: must divide gdn_heads=4"):
        check_config(Config(ModelConfig(layers=("grouped_gdn",), gdn_key_heads=3)))
    with pytest.raises(ValueError, match=r"gdn_key_heads=2 is invalid for the 'gdn' kind"):
        check_config(Config(ModelConfig(layers=("gdn",), gdn_key_heads=2)))
    with pytest.raises(ValueError, match=r"inserted_blocks=\(4,\) is invalid: must be distinct indices of the 2"):
        ModelConfig(layers=("attn", "gdn"), inserted_blocks=(4,))
    with pytest.raises(ValueError, match=r"train.trainable='some' is invalid: allowed are \('all', 'new'\)"):
        TrainConfig(trainable="some")
    config = Config(ModelConfig(vocab_size=8, d_model=16, num_heads=2, layers=("attn",)), SleepConfig(4, 1))
    with pytest.raises(ValueError, match=r"train.trainable='new' is invalid for this model: it declares no new"):
        make_optimizer(TrainConfig(trainable="new"), config)


def test_tied_embeddings_have_no_head_and_the_new_kinds_declare_their_axes():
    model = ModelConfig(
        vocab_size=16, d_model=32, num_heads=4, layers=("gated_attn", "grouped_gdn"), gdn_key_heads=2,
        tie_embeddings=True, zero_centered_norm=True,
    )  # fmt: skip
    boxes = param_annotations(Config(model, SleepConfig(4, 2)))["params"]
    assert "head" not in boxes
    declared = {
        jax.tree_util.keystr(path): (tuple(box.axes), box.hidden_matrix)
        for path, box in jax.tree_util.tree_leaves_with_path(boxes, is_leaf=lambda x: hasattr(x, "axes"))
    }
    assert declared["['blocks_0']['gated_attn']['gate']['kernel']"] == (("embed", "heads"), True)
    assert declared["['blocks_0']['gated_attn']['q_norm']['scale']"] == ((None,), False)
    assert declared["['blocks_1']['grouped_gdn']['q']['kernel']"] == (("embed", "heads"), True)
    assert declared["['blocks_1']['grouped_gdn']['a']['kernel']"] == (("embed", None), False)
    params = init_params(jax.random.key(0), Config(model, SleepConfig(4, 2)))
    assert not np.any(params["params"]["final_norm"]["scale"])  # zero-centred: starts at the identity


MESH_SCRIPT = """
import json, sys
import jax, numpy as np
from sleeplm.hf.convert import Pretrained, convert
from sleeplm.training.checkpoint import Checkpointer
from sleeplm.parallel.mesh import make_mesh, MeshConfig, param_shardings
from sleeplm.experiment.schema import experiment_from_json
from sleeplm.config import Config
source, out = sys.argv[1], sys.argv[2]
mesh = make_mesh(MeshConfig(data=1, fsdp=2, tensor=2))
placed = []
original = jax.make_array_from_callback
def recording(shape, sharding, callback):
    array = original(shape, sharding, callback)
    placed.append(len(array.addressable_shards))
    return array
jax.make_array_from_callback = recording
workdir = convert(source, out, mesh=mesh)
experiment = experiment_from_json(json.loads((workdir / "experiment.json").read_text()))
expected = Pretrained.open(source).params()
restored, _ = Checkpointer(workdir / "checkpoints", keep=1).restore_params(experiment)
same = all(jax.tree.leaves(jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), restored, expected)))
shardings = param_shardings(experiment.config, mesh)
split = sum(len(set(s.spec) - {None}) > 0 for s in jax.tree.leaves(shardings))
# --init-from under the same mesh: the parameters restore straight into the run's shardings
from sleeplm.training.finetune import PretrainedStart
from sleeplm.core.parameters import init_params
fresh = jax.jit(lambda: init_params(jax.random.key(1), experiment.config), out_shardings=shardings)()
started = PretrainedStart(workdir, experiment, experiment.config.model).params(fresh)
start_same = all(jax.tree.leaves(jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), started, expected)))
start_sharded = all(jax.tree.leaves(jax.tree.map(lambda a, b: a.sharding == b.sharding, started, fresh)))
print("RESULTS " + json.dumps({"same": same, "placed": placed, "split": split, "start": [start_same, start_sharded]}))
"""


def test_convert_under_a_mesh_places_each_parameter_shard_by_shard(checkpoints, tmp_path):
    environment = fake_cpu_devices(4, dict(os.environ, JAX_PLATFORMS="cpu"))
    command = [sys.executable, "-c", MESH_SCRIPT, str(checkpoints["qwen3_next"][0]), str(tmp_path / "sharded")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=environment, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULTS ")]
    assert done.returncode == 0 and lines, done.stderr[-3000:]
    results = json.loads(lines[-1][len("RESULTS ") :])
    assert results["same"] and results["split"] > 10
    assert results["placed"] and all(count == 4 for count in results["placed"])
    assert results["start"] == [True, True]


def test_a_checkpoint_without_a_tokenizer_and_a_small_vocabulary_converts_and_generates_from_ids(tmp_path, capsys):
    """A checkpoint that ships no tokenizer.json, its vocabulary under the 258 tokens of a byte-level BPE: it
    converts (the task names the workdir's tokenizer.json, absent until one is put there), `generate --ids` works
    (no text), and what needs a tokenizer fails naming the missing tokenizer.json."""
    torch.manual_seed(3)
    source = tmp_path / "tiny"
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA | {"vocab_size": 97})).float().save_pretrained(
        source, safe_serialization=True
    )
    workdir = tmp_path / "converted"
    cli_main(["convert", "--from-hf", str(source), "--out", str(workdir), "--sleep.window", "4"])
    experiment = experiment_from_json(json.loads((workdir / "experiment.json").read_text()))
    assert experiment.config.model.vocab_size == 97 and not (workdir / "tokenizer.json").exists()
    capsys.readouterr()
    cli_main(["generate", "--workdir", str(workdir), "--ids", "--prompt", "5 6 7", "--max-new-tokens", "3"])
    row = json.loads(capsys.readouterr().out)
    assert len(row["ids"]) == 3 and all(0 <= i < 97 for i in row["ids"]) and row["text"] is None
    with pytest.raises(SystemExit, match=r"converted/tokenizer.json"):
        cli_main(["generate", "--workdir", str(workdir), "--prompt", "the"])


def test_export_of_a_retrofitted_model_fails_naming_the_inserted_blocks_and_why(checkpoints, tmp_path):
    directory, _ = checkpoints["llama"]
    workdir = convert(directory, tmp_path / "retrofitted", insert_gdn_at=(1, 2))
    message = (
        r"retrofitted is not exportable: a retrofit inserted blocks into its model \(model.inserted_blocks=\(1, 3\), "
        r"mixer-only \['gdn', 'gdn'\]\), and transformers has no architecture with blocks inserted"
    )
    with pytest.raises(SystemExit, match=message):
        cli_main(["export", "--from", str(workdir), "--to-hf", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()
