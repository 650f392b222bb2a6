"""`sleeplm train|eval|generate|score|serve|evaluate-long|convert|export|plot|demo|stream|presets` (also
`python -m sleeplm ...`).

Overrides use dotted keys after the options: `sleeplm train --preset rule110-cpu --workdir runs/a --sleep.passes 2
--task.steps 4 --train.steps 800`.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

# Exit codes of `sleeplm train` besides 0 (done) and 1 (a bad setting, file or checkpoint: "error: ..."):
EXIT_NON_FINITE = 65  # sysexits' EX_DATAERR: the loss or gradient norm became NaN / infinite; nothing of it saved
EXIT_PREEMPTED = 75  # sysexits' EX_TEMPFAIL: SIGTERM / SIGINT, the step checkpointed; the same command resumes


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
    from sleeplm.experiment.workdir import Workdir
    from sleeplm.training.presets import build_experiment
    from sleeplm.training.run import run_training

    if args.distributed:
        _initialize_distributed()
    overrides = parse_overrides(extra)
    experiment = build_experiment(args.preset, overrides)
    start = None
    if args.init_from:
        from sleeplm.training.finetune import fine_tuning
        from sleeplm.training.retrofit import parse_positions

        insert_at = parse_positions(args.insert_gdn_at) if args.insert_gdn_at else ()
        experiment, start = fine_tuning(experiment, overrides, args.init_from, insert_at, args.insert_kind)
    elif args.insert_gdn_at:
        raise SystemExit("error: --insert-gdn-at inserts blocks into a pretrained model: give --init-from WORKDIR")
    mesh = _mesh(args.mesh)
    if args.fresh and Workdir(args.workdir).checkpoints_path.exists():
        import shutil

        Workdir(args.workdir).writer_lock().check_free()  # never delete the files of a run another process trains
        shutil.rmtree(args.workdir)
    from sleeplm.training.preemption import Preempted
    from sleeplm.training.run import NonFiniteTrainingError

    try:
        result = run_training(experiment, args.workdir, mesh=mesh, rules=args.rules, stop_at=args.stop_at, start=start)
    except Preempted as stopped:
        print(f"preempted: {stopped}", file=sys.stderr)
        raise SystemExit(EXIT_PREEMPTED) from None
    except NonFiniteTrainingError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(EXIT_NON_FINITE) from None
    print(json.dumps(result, indent=2))
    run = Workdir(args.workdir)
    outputs = (run.metrics_path, run.experiment_path, run.checkpoints_path)
    print(f"outputs in {args.workdir}: " + ", ".join(path.name for path in outputs))


def _mesh(text: str | None):
    if not text:
        return None
    from sleeplm.parallel.mesh import MeshConfig, make_mesh

    return make_mesh(MeshConfig.parse(text))


def _convert_hf(args, extra) -> None:
    from sleeplm.config import SleepConfig
    from sleeplm.experiment.overrides import override_section
    from sleeplm.experiment.workdir import Workdir
    from sleeplm.hf.convert import convert
    from sleeplm.training.retrofit import parse_positions

    overrides = parse_overrides(extra)
    outside = [key for key in overrides if not key.startswith("sleep.")]
    if outside:
        raise SystemExit(f"error: --{outside[0]} is not a convert option: convert takes --sleep.FIELD overrides")
    changes = {key.partition(".")[2]: value for key, value in overrides.items()}
    sleep = override_section(SleepConfig(window=1024, passes=1, eviction="sliding"), "sleep", changes)
    insert_at = parse_positions(args.insert_gdn_at) if args.insert_gdn_at else ()
    out = convert(
        args.from_hf, args.out, sleep, mesh=_mesh(args.mesh), rules=args.rules, insert_gdn_at=insert_at,
        insert_kind=args.insert_kind,
    )  # fmt: skip
    run = Workdir(out)
    names = ", ".join(path.name for path in (run.experiment_path, run.checkpoints_path, run.hf_config_path))
    print(f"converted {args.from_hf} into {out}: {names} (a weights checkpoint at step 0)")


def _export_hf(args, extra) -> None:
    from sleeplm.hf.export import export

    out = export(args.source, args.to_hf, step=args.step)
    print(f"exported {args.source} into {out}: config.json, model.safetensors")


def _load_run(workdir: Path, step: int | None, codec: bool = True):
    """A run's `Workdir`, experiment, codec (checked against the model; None when not asked for) and the train
    state (parameters and step) of a checkpoint, all read through the `Workdir`."""
    from sleeplm.experiment.workdir import Workdir
    from sleeplm.training.step import TrainState

    run = Workdir(workdir).check()
    experiment = run.experiment()
    coder = run.codec(experiment) if codec else None
    params, restored = run.restore_params(experiment, step=step)
    return run, experiment, coder, TrainState(params, None, restored)


def _eval(args, extra) -> None:
    import dataclasses

    from sleeplm.training.evaluate import eval_sets, evaluate

    run, experiment, _, state = _load_run(args.workdir, args.step, codec=False)
    task = run.task_config(experiment, current_corpus=args.current_corpus)  # the run's tokenizer and corpus
    experiment = dataclasses.replace(experiment, task=task)
    if args.eval_examples:
        experiment = dataclasses.replace(
            experiment, run=dataclasses.replace(experiment.run, eval_examples=args.eval_examples)
        )
    metrics = {"step": int(state.step)} | evaluate(state.params, eval_sets(experiment), experiment)
    out = run.write_eval(int(state.step), metrics)
    print(json.dumps(metrics, indent=2))
    print(f"wrote {out}")


def _generate(args, extra) -> None:
    import jax

    from sleeplm.inference.generate import Sampling, generate
    from sleeplm.inference.streams import restore_stream, save_stream, start_stream

    run, experiment, codec, state = _load_run(args.workdir, args.step, codec=not args.ids)
    if args.ids:  # token ids in; the text out only when the run has a tokenizer
        try:
            codec = run.codec(experiment)
        except (ValueError, OSError) as error:
            print(f"no text for the generated ids: {error}", file=sys.stderr)
    config = experiment.config
    prompts = [[int(i) for i in p.split()] for p in args.prompt] if args.ids else [codec.encode(p) for p in args.prompt]
    if args.stream:
        stream = restore_stream(args.stream, config)
    else:
        capacity = None if config.sleep.eviction_mode.bounded else args.capacity
        stream = start_stream(config, len(prompts), jax.random.key(args.seed), capacity)
    sampling = Sampling(args.temperature, args.top_k, args.top_p)
    result = generate(
        state.params, stream, prompts, config, max_new_tokens=args.max_new_tokens, sampling=sampling,
        stop_tokens=args.stop_id, sleep=args.sleep,
    )  # fmt: skip
    rows = [[int(t) for t in row[:n]] for row, n in zip(result.tokens, result.lengths, strict=True)]
    for prompt, row in zip(args.prompt, rows, strict=True):
        print(json.dumps({"prompt": prompt, "ids": row, "text": None if codec is None else codec.decode(row)}))
    if args.save_stream:
        print(f"saved the stream to {save_stream(args.save_stream, result.stream, config)}", file=sys.stderr)


def _score(args, extra) -> None:
    import numpy as np

    from sleeplm.inference.score import score

    _, experiment, codec, state = _load_run(args.workdir, args.step, codec=not args.ids_file)
    if args.ids_file:
        ids = np.load(args.ids_file, mmap_mode="r")
        ids = ids[None] if ids.ndim == 1 else ids
    else:
        ids = np.asarray([codec.encode(args.text_file.read_text())], np.int32)
    result = score(state.params, ids, experiment.config, block_windows=args.block_windows, progress=True)
    record = {"step": int(state.step), "tokens": result.tokens, "mean_nll": result.mean_nll}
    record |= {"perplexity": float(np.exp(result.mean_nll)), "buckets": result.buckets}
    print(json.dumps(record, indent=2))
    if args.out:
        args.out.write_text(json.dumps(record, indent=2) + "\n")
        print(f"wrote {args.out}", file=sys.stderr)


def _evaluate_long(args, extra) -> None:
    from sleeplm.evaluation.report import write_report
    from sleeplm.evaluation.runner import check_length, run_suite
    from sleeplm.experiment.workdir import Workdir

    if args.out.exists() and not args.out.is_dir():
        raise ValueError(f"--out {args.out} is a file: give a directory (created if missing)")
    run = Workdir(args.workdir).check()
    experiment = run.experiment()
    codec, window = run.codec(experiment), experiment.config.sleep.window
    if min(args.lengths) < window:
        raise ValueError(f"--lengths {min(args.lengths)} is invalid: a length is at least one window ({window} tokens)")
    try:
        check_length(codec, args.tasks, min(args.lengths), args.depths, args.samples, args.seed)
    except ValueError as error:
        raise ValueError(f"--lengths {min(args.lengths)} is too short for the prompts: {error}") from None
    params, step = run.restore_params(experiment, step=args.step)  # after the checks: they fail at once
    results = run_suite(
        params, experiment.config, codec, args.tasks, args.lengths, args.depths, args.samples, args.seed,
        block_windows=args.block_windows, batch_size=args.batch_size, progress=True,
    )  # fmt: skip
    results = {"workdir": str(args.workdir), "step": step} | results
    for cell in results["summary"]:
        print(f"{cell['task']:<16} length {cell['length']:>8} depth {cell['depth']:>5g}%  {cell['accuracy']:.3f}")
    for path in write_report(results, args.out):
        print(f"wrote {path}", file=sys.stderr)


def _listed(parse, allowed: str):
    """An argparse type: comma-separated distinct values, each `parse(text)`; errors name what is `allowed`."""

    def parse_list(text: str) -> list:
        try:
            values = [parse(item.strip()) for item in text.split(",")]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is invalid: allowed are {allowed}, comma-separated") from None
        if len(set(values)) != len(values):
            raise argparse.ArgumentTypeError(f"{text!r} repeats a value: give each once")
        return values

    return parse_list


def _in_range(kind, low, high=None):
    """`kind(text)` checked to lie in [low, high]."""

    def parse(text: str):
        value = kind(text)
        if value < low or (high is not None and value > high):
            raise ValueError(text)
        return value

    return parse


def _suite_task(name: str) -> str:
    from sleeplm.evaluation.tasks import TASKS

    if name not in TASKS:
        raise ValueError(name)
    return name


def _at_least(low: int):
    """An argparse type: an integer >= `low`."""

    def parse(text: str) -> int:
        try:
            return _in_range(int, low)(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is invalid: must be an integer >= {low}") from None

    return parse


def _serve(args, extra) -> None:
    import uvicorn

    from sleeplm.experiment.workdir import Workdir
    from sleeplm.inference.engine import Engine
    from sleeplm.inference.scheduler import Scheduler
    from sleeplm.inference.server.app import create_app
    from sleeplm.inference.server.chat import ChatTemplate, end_of_text

    run = Workdir(args.workdir).check()
    experiment = run.experiment()
    codec = run.codec(experiment)
    mesh = _mesh(args.mesh)
    capacity = None if experiment.config.sleep.eviction_mode.bounded else args.capacity
    engine = Engine.from_workdir(
        args.workdir, slots=args.slots, step=args.step, capacity=capacity, mesh=mesh, rules=args.rules
    )
    print(f"compiling the engine's steps for {args.slots} slots", file=sys.stderr, flush=True)
    engine.warm_up()
    scheduler = Scheduler(
        engine, state_dir=args.state_dir, host_sessions=args.host_sessions, max_tokens_limit=args.max_tokens_limit,
        decode=codec.decode,
    )  # fmt: skip
    name = run.path.name
    chat = ChatTemplate.for_workdir(run.path)
    app = create_app(scheduler, codec, name, chat=chat, stop_tokens=end_of_text(run.path, experiment.task))
    scheduler.start()
    try:
        print(f"serving {name} ({args.slots} slots) at http://{args.host}:{args.port}/v1", file=sys.stderr, flush=True)
        uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    finally:
        scheduler.stop()


def _plot(args, extra) -> None:
    from sleeplm.cli.plot import plot_runs

    print(f"wrote {plot_runs(args.runs, args.metric, args.out, chance=args.chance)}")


def _demo(args, extra) -> None:
    from sleeplm.cli.demo import main as demo_main

    demo_main(extra)


def _stream(args, extra) -> None:
    from sleeplm.cli.stream_demo import main as stream_main

    stream_main(extra)


def _presets(args, extra) -> None:
    from sleeplm.experiment.schema import align_task_and_model
    from sleeplm.training.presets import PRESETS

    for name, preset in PRESETS.items():
        experiment = align_task_and_model(preset)  # as `train --preset NAME` builds it: the task's window is L
        m, s, t = experiment.config.model, experiment.config.sleep, experiment.train
        print(f"{name:<12} {experiment.task}  d={m.d_model} layers={len(m.layers)} L={s.window} batch={t.batch_size}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sleeplm", description="LLM sleep: train, evaluate, convert, plot.")
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="train a preset (with --SECTION.FIELD VALUE overrides)")
    train.add_argument("--preset", required=True)
    train.add_argument("--workdir", type=Path, required=True)
    train.add_argument("--fresh", action="store_true", help="delete the workdir's run first instead of resuming")
    train.add_argument("--mesh", default=None, help="shard over devices, e.g. data=2,fsdp=2,tensor=2 (-1: the rest)")
    train.add_argument("--rules", default="fsdp+tp", help="logical-axis rules: dp, fsdp or fsdp+tp")
    train.add_argument("--stop-at", type=int, default=None, help="stop after this step, resumable (as if preempted)")
    train.add_argument("--distributed", action="store_true", help="initialise jax.distributed (multi-host)")
    train.add_argument("--init-from", type=Path, default=None, help="start from this workdir's model (sleeplm convert)")
    _insert_options(train)
    train.set_defaults(run=_train)
    evaluate = commands.add_parser("eval", help="evaluate a run's checkpoint on held-out data")
    evaluate.add_argument("--workdir", type=Path, required=True)
    evaluate.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    evaluate.add_argument("--eval-examples", type=int, default=None)
    evaluate.add_argument(
        "--current-corpus",
        action="store_true",
        help="a text run: evaluate on its corpus as it is now, even when it changed since training (corpus.json)",
    )
    evaluate.set_defaults(run=_eval)
    plot = commands.add_parser("plot", help="plot runs' held-out metric against training tokens")
    plot.add_argument("runs", type=Path, nargs="+")
    plot.add_argument("--metric", default="exact")
    plot.add_argument("--chance", type=float, default=None)
    plot.add_argument("--out", type=Path, required=True)
    plot.set_defaults(run=_plot)
    generate = commands.add_parser("generate", help="continue prompts with a run's checkpoint (sleeping as it goes)")
    generate.add_argument("--workdir", type=Path, required=True)
    generate.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    generate.add_argument("--prompt", action="append", required=True, help="a prompt (repeat for a batch)")
    generate.add_argument("--ids", action="store_true", help="prompts are whitespace-separated token ids")
    generate.add_argument("--max-new-tokens", type=int, default=32)
    generate.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    generate.add_argument("--top-k", type=int, default=None)
    generate.add_argument("--top-p", type=float, default=1.0)
    generate.add_argument("--seed", type=int, default=0)
    generate.add_argument("--stop-id", type=int, action="append", default=[], help="a token id that ends a row")
    generate.add_argument("--sleep", default="on_full", help="on_full (sleep as a window fills) or deferred")
    generate.add_argument("--stream", type=Path, default=None, help="continue a saved stream")
    generate.add_argument("--save-stream", type=Path, default=None, help="save the stream here to continue later")
    generate.add_argument("--capacity", type=int, default=4096, help="tokens a no-eviction stream can hold")
    generate.set_defaults(run=_generate)
    scorer = commands.add_parser("score", help="log-likelihood of a long text under a run's checkpoint")
    scorer.add_argument("--workdir", type=Path, required=True)
    scorer.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    source = scorer.add_mutually_exclusive_group(required=True)
    source.add_argument("--text-file", type=Path, help="a text, encoded with the run's tokenizer")
    source.add_argument("--ids-file", type=Path, help="token ids, .npy (T,) or (B, T), read memory-mapped")
    scorer.add_argument("--block-windows", type=int, default=16, help="windows per device block")
    scorer.add_argument("--out", type=Path, default=None)
    scorer.set_defaults(run=_score)
    serve = commands.add_parser("serve", help="an OpenAI-compatible HTTP server over a run's checkpoint, with sessions")
    serve.add_argument("--workdir", type=Path, required=True)
    serve.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    serve.add_argument("--slots", type=int, default=8, help="sessions decoded together on the device")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--state-dir", type=Path, default=None, help="sessions kept on disk here survive a restart")
    serve.add_argument("--host-sessions", type=int, default=64, help="sessions kept in host memory before disk")
    serve.add_argument("--max-tokens-limit", type=int, default=4096, help="the most tokens a request may ask for")
    serve.add_argument("--mesh", default=None, help="shard params and slots over devices, e.g. fsdp=-1")
    serve.add_argument("--rules", default="fsdp+tp", help="logical-axis rules: dp, fsdp or fsdp+tp")
    serve.add_argument(
        "--capacity", type=_at_least(1), default=4096, help="tokens a session holds under sleep.eviction 'none'"
    )
    serve.set_defaults(run=_serve)
    long = commands.add_parser("evaluate-long", help="the long-context suite (passkey, RULER niah, vt): JSON, heatmaps")
    long.add_argument("--workdir", type=Path, required=True)
    long.add_argument("--step", type=_at_least(0), default=None, help="checkpoint step (default: the latest)")
    suite_tasks = "passkey, niah_single, niah_multikey, niah_multivalue, niah_multiquery, vt"
    long.add_argument("--tasks", type=_listed(_suite_task, suite_tasks), required=True, help=suite_tasks)
    lengths = _listed(_in_range(int, 1, 1 << 20), "token counts from one window to 1048576")
    long.add_argument("--lengths", type=lengths, required=True, help="context lengths in tokens, e.g. 4096,65536")
    depths = _listed(_in_range(float, 0, 100), "needle depths in percent, 0 to 100")
    long.add_argument("--depths", type=depths, default=[0.0, 25.0, 50.0, 75.0, 100.0], help="percent, e.g. 0,50,100")
    long.add_argument("--samples", type=_at_least(1), default=4, help="examples per task x length x depth")
    long.add_argument("--seed", type=_at_least(0), default=0)
    long.add_argument("--block-windows", type=_at_least(1), default=16, help="windows per device block of the prompt")
    long.add_argument("--batch-size", type=_at_least(1), default=32, help="prompts read together")
    long.add_argument("--out", type=Path, required=True, help="directory for results.json and heatmap_TASK.png")
    long.set_defaults(run=_evaluate_long)
    convert = commands.add_parser("convert", help="a transformers checkpoint directory to a sleeplm workdir")
    convert.add_argument("--from-hf", type=Path, required=True, help="config.json, *.safetensors, tokenizer.json")
    convert.add_argument("--out", type=Path, required=True, help="the new workdir (must not exist)")
    convert.add_argument("--mesh", default=None, help="place the weights sharded over devices, e.g. fsdp=-1")
    convert.add_argument("--rules", default="fsdp+tp", help="logical-axis rules: dp, fsdp or fsdp+tp")
    _insert_options(convert)
    convert.set_defaults(run=_convert_hf)
    export = commands.add_parser("export", help="a workdir's parameters as a transformers checkpoint directory")
    export.add_argument("--from", dest="source", type=Path, required=True, help="a sleeplm workdir")
    export.add_argument("--to-hf", type=Path, required=True, help="the new checkpoint directory (must not exist)")
    export.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    export.set_defaults(run=_export_hf)
    for name, fn, text in (
        ("demo", _demo, "train Rule 110 at N=1 and N=2 on the same data, compare (the README's make demo)"),
        ("stream", _stream, "stream tokens through wake/sleep, check against forward, time wake and sleep"),
        ("presets", _presets, "list the named presets"),
    ):
        sub = commands.add_parser(name, help=text, add_help=name == "presets")
        sub.set_defaults(run=fn)
    return parser


def _insert_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--insert-gdn-at", default=None, help="retrofit: insert mixer-only blocks before these blocks, e.g. 2,5"
    )
    parser.add_argument("--insert-kind", default="gdn", help="the mixer kind of the inserted blocks")


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
    if extra and args.command not in ("train", "convert", "demo", "stream"):
        raise SystemExit(f"error: unrecognized arguments: {' '.join(extra)}")
    try:
        args.run(args, extra)
    except (ValueError, OSError) as error:  # bad settings, files or checkpoints: one clear line, no traceback
        raise SystemExit(f"error: {error}") from None
