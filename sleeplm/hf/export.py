"""`sleeplm export --from WORKDIR --to-hf DIR`: a workdir's parameters (its latest checkpoint, or a given step) as a
transformers checkpoint directory: config.json (the converted checkpoint's own, kept in the workdir, with every
field the model config sets written from it), model.safetensors (float32) and the workdir's tokenizer.json. The
tensor map is the one conversion reads (`mapping.tensor_rules`), joined instead of split, so converting the
export gives the same tensors bit for bit. Like conversion, nothing is written to DIR unless it all succeeds.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import numpy as np

from sleeplm.experiment.files import TOKENIZER, building
from sleeplm.hf.families import family_for_model, hf_config
from sleeplm.hf.files import write_safetensors
from sleeplm.hf.mapping import tensor_rules


def flat_params(params: dict) -> dict[str, np.ndarray]:
    """{"blocks_0/attn/q/kernel": array, ...} below "params", fetched to the host."""
    leaves = jax.tree_util.tree_leaves_with_path(jax.device_get(params["params"]))
    return {"/".join(str(k.key) for k in path): np.asarray(leaf) for path, leaf in leaves}


def export(workdir: Path, out: Path, step: int | None = None) -> Path:
    """Writes the transformers checkpoint of `workdir`'s parameters into the new directory `out`; returns it."""
    from sleeplm.experiment.workdir import Workdir

    run = Workdir(workdir).check()
    experiment = run.experiment()
    model = experiment.config.model
    inserted = model.inserted_blocks
    if inserted:
        raise ValueError(
            f"{run.path} is not exportable: a retrofit inserted blocks into its model "
            f"(model.inserted_blocks={model.inserted_blocks}, mixer-only {[model.layers[i] for i in inserted]}), "
            "and transformers has no architecture with blocks inserted into a pretrained stack, so they have no "
            "tensors to go to; use the workdir with sleeplm eval, generate, score or train --init-from instead"
        )
    base = run.hf_config()
    hf = hf_config(model, base)
    rules = tensor_rules(family_for_model(model, base), model)
    params, _ = run.restore_params(experiment, step=step)
    flat = flat_params(params)
    tensors = {rule.hf_name: rule.layout.join(tuple(flat[leaf] for leaf in rule.leaves)) for rule in rules}
    with building(out) as directory:
        write_safetensors(directory / "model.safetensors", tensors, metadata={"format": "pt"})
        (directory / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
        if run.tokenizer_path.is_file():
            shutil.copyfile(run.tokenizer_path, directory / TOKENIZER)
    return Path(out).absolute()
