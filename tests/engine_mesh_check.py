# ruff: noqa: E402
"""Run in a subprocess with 8 fake CPU devices (see test_engine.py): the serving scheduler over a sharded engine
against one device, on meshes that split the slots (data), the parameters (fsdp) and the heads (tensor). Prints one
JSON object: each mesh's replies, the single device's, and the shardings the engine's arrays ended with."""

from __future__ import annotations

from fake_devices import fake_cpu_devices

fake_cpu_devices(8)  # before jax starts

import json
import queue

import jax
import numpy as np

from sleeplm import Config, ModelConfig, SleepConfig, init_params
from sleeplm.inference.engine import Engine
from sleeplm.inference.generate import Sampling
from sleeplm.inference.scheduler import Failed, Finished, Request, Scheduler
from sleeplm.parallel.mesh import MeshConfig, make_mesh

MESHES = {"data=2,tensor=4": 4, "fsdp=2,tensor=2,data=2": 4, "fsdp=8": 3}  # mesh -> slots (3: not divisible)
MODEL = ModelConfig(vocab_size=64, d_model=64, layers=("attn", "gdn"), num_heads=4, num_kv_heads=4, mlp_dim=128,
                    gdn_chunk_size=4)  # fmt: skip
CONFIG = Config(MODEL, SleepConfig(8, 2, "hard"))


def replies(engine: Engine) -> list[list[int]]:
    scheduler = Scheduler(engine, host_sessions=1).start()
    sessions = [scheduler.create_session() for _ in range(5)]
    out = {s: queue.Queue() for s in sessions}
    rng = np.random.default_rng(0)
    results = []
    for turn in range(2):
        for i, s in enumerate(sessions):
            prompt = tuple(int(t) for t in rng.integers(0, MODEL.vocab_size, 3 + 4 * i))
            sampling = Sampling(0.8, 8, 0.95) if i % 2 else Sampling()
            scheduler.submit(Request(prompt, 7, sampling, seed=i if turn == 0 else None, session=s), out[s].put)
        for s in sessions:
            tokens = []
            while not isinstance(event := out[s].get(timeout=600), Finished):
                assert not isinstance(event, Failed), event.error
                tokens.append(event.id)
            results.append(tokens)
    scheduler.stop()
    return results


params = init_params(jax.random.key(0), CONFIG)
params = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.key(1), p.shape), params)
result = {"one_device": replies(Engine(params, CONFIG, slots=4))}
for text, slots in MESHES.items():
    engine = Engine(params, CONFIG, slots=slots, mesh=make_mesh(MeshConfig.parse(text)))
    result[text] = replies(engine)
    result[text + " shardings"] = sorted({str(leaf.sharding.spec) for leaf in jax.tree.leaves(engine.stream)})
    result[text + " devices"] = len(jax.tree.leaves(engine.params)[0].sharding.device_set)
print("RESULTS " + json.dumps(result))
