"""`sleeplm train|eval|plot|demo|stream|presets` (also `python -m sleeplm ...`).

Overrides use dotted keys after the options: `sleeplm train --preset rule110-cpu --workdir runs/a --sleep.passes 2
--task.steps 4 --train.steps 800`.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path


def parse_overrides(extra: list[str]) -> dict[str, str]:
    """["--sleep.passes", "2", "--task.steps=4"] -> {"sleep.passes": "2", "task.steps": "4"}."""
    overrides, i = {}, 0
    while i < len(extra):
        item = extra[i]
        if not item.startswith("--") or "." not in item:
            raise SystemExit(f"error: unexpected argument {item!r}: overrides look like --SECTION.FIELD VALUE")
        if "=" in item:
            key, value = item[2:].split("=", 1)
            i += 1
        elif i + 1 < len(extra):
            key, value = item[2:], extra[i + 1]
            i += 2
        else:
            raise SystemExit(f"error: {item} needs a value")
        overrides[key] = value
    return overrides


def _initialize_distributed() -> None:
    """`jax.distributed.initialize` for multi-host runs. On TPU pods, SLURM and other clusters JAX detects the
    coordinator, process count and id itself; elsewhere set JAX_COORDINATOR_ADDRESS (host:port of process 0),
    JAX_NUM_PROCESSES and JAX_PROCESS_ID."""
    import os

    import jax

    count, index = os.environ.get("JAX_NUM_PROCESSES"), os.environ.get("JAX_PROCESS_ID")
    jax.distributed.initialize(
        num_processes=None if count is None else int(count), process_id=None if index is None else int(index)
    )


def _train(args, extra) -> None:
    from sleeplm.loop import run_training
    from sleeplm.presets import build_experiment

    if args.distributed:
        _initialize_distributed()
    experiment = build_experiment(args.preset, parse_overrides(extra))
    mesh = None
    if args.mesh:
        from sleeplm.parallel import MeshConfig, make_mesh

        mesh = make_mesh(MeshConfig.parse(args.mesh))
    if args.fresh and (args.workdir / "checkpoints").exists():
        import shutil

        shutil.rmtree(args.workdir)
    result = run_training(experiment, args.workdir, mesh=mesh, rules=args.rules, stop_at=args.stop_at)
    print(json.dumps(result, indent=2))
    print(f"outputs in {args.workdir}: metrics.jsonl, experiment.json, checkpoints/")


def _eval(args, extra) -> None:
    import dataclasses

    import jax

    from sleeplm.checkpoint import Checkpointer
    from sleeplm.evaluate import eval_sets, evaluate
    from sleeplm.loop import train_iterator
    from sleeplm.presets import experiment_from_json
    from sleeplm.train import init_train_state

    record_path = args.workdir / "experiment.json"
    if not record_path.exists():
        raise SystemExit(f"error: {record_path} does not exist: --workdir must be a training run directory")
    experiment = experiment_from_json(json.loads(record_path.read_text()))
    if args.eval_examples:
        run = dataclasses.replace(experiment.run, eval_examples=args.eval_examples)
        experiment = dataclasses.replace(experiment, run=run)
    checkpoints = Checkpointer(args.workdir / "checkpoints", keep=experiment.run.keep_checkpoints)
    if checkpoints.latest_step() is None:
        raise SystemExit(f"error: no checkpoint in {checkpoints.directory}")
    template = init_train_state(jax.random.key(0), experiment.config, experiment.train)
    state = checkpoints.restore(template, train_iterator(experiment), experiment, step=args.step)
    metrics = {"step": int(state.step)} | evaluate(state.params, eval_sets(experiment), experiment)
    out = args.workdir / f"eval_step{int(state.step)}.json"
    out.write_text(json.dumps(metrics, indent=2) + "\n")
    print(json.dumps(metrics, indent=2))
    print(f"wrote {out}")


def _plot(args, extra) -> None:
    from sleeplm.plot import plot_runs

    print(f"wrote {plot_runs(args.runs, args.metric, args.out, chance=args.chance)}")


def _demo(args, extra) -> None:
    from sleeplm.demo import main as demo_main

    demo_main(extra)


def _stream(args, extra) -> None:
    from sleeplm.stream_demo import main as stream_main

    stream_main(extra)


def _presets(args, extra) -> None:
    from sleeplm.presets import PRESETS

    for name, experiment in PRESETS.items():
        m, s, t = experiment.config.model, experiment.config.sleep, experiment.train
        print(f"{name:<12} {experiment.task}  d={m.d_model} layers={len(m.layers)} L={s.window} batch={t.batch_size}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sleeplm", description="LLM sleep: train, evaluate, plot.")
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="train a preset (with --SECTION.FIELD VALUE overrides)")
    train.add_argument("--preset", required=True)
    train.add_argument("--workdir", type=Path, required=True)
    train.add_argument("--fresh", action="store_true", help="delete the workdir's run first instead of resuming")
    train.add_argument("--mesh", default=None, help="shard over devices, e.g. data=2,fsdp=2,tensor=2 (-1: the rest)")
    train.add_argument("--rules", default="fsdp+tp", help="logical-axis rules: dp, fsdp or fsdp+tp")
    train.add_argument("--stop-at", type=int, default=None, help="stop after this step, resumable (as if preempted)")
    train.add_argument("--distributed", action="store_true", help="initialise jax.distributed (multi-host)")
    train.set_defaults(run=_train)
    evaluate = commands.add_parser("eval", help="evaluate a run's checkpoint on held-out data")
    evaluate.add_argument("--workdir", type=Path, required=True)
    evaluate.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    evaluate.add_argument("--eval-examples", type=int, default=None)
    evaluate.set_defaults(run=_eval)
    plot = commands.add_parser("plot", help="plot runs' held-out metric against training tokens")
    plot.add_argument("runs", type=Path, nargs="+")
    plot.add_argument("--metric", default="exact")
    plot.add_argument("--chance", type=float, default=None)
    plot.add_argument("--out", type=Path, required=True)
    plot.set_defaults(run=_plot)
    for name, fn, text in (
        ("demo", _demo, "train Rule 110 at N=1 and N=2 on the same data, compare (the README's make demo)"),
        ("stream", _stream, "stream tokens through wake/sleep, check against forward, time wake and sleep"),
        ("presets", _presets, "list the named presets"),
    ):
        sub = commands.add_parser(name, help=text, add_help=name == "presets")
        sub.set_defaults(run=fn)
    return parser


def _show_progress_messages() -> None:
    """The package's info messages (e.g. a tokenizer being trained, a corpus being tokenized) go to stderr."""
    logger = logging.getLogger("sleeplm")
    if not logger.handlers:
        logger.addHandler(logging.StreamHandler())
        logger.setLevel(logging.INFO)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    _show_progress_messages()
    args, extra = build_parser().parse_known_args(argv)
    if extra and args.command not in ("train", "demo", "stream"):
        raise SystemExit(f"error: unrecognized arguments: {' '.join(extra)}")
    try:
        args.run(args, extra)
    except ValueError as error:  # bad settings: one clear line, no traceback
        raise SystemExit(f"error: {error}") from None
