"""GPU check and benchmark of the Pallas gated delta rule against the xla path and the recurrence, in one run.

    python -m pallas_kernels.gated_delta.bench [--batch 8 --length 4096 --heads 16 --dim 128] [--out FILE]

1. timing: forward and forward+backward times (median of --repeats) of xla, pallas (its default dots, and with
   precision="tf32" and "bfloat16") and the recurrence at the benchmark shape, float32 and bfloat16 inputs, with
   the ratio of each to xla, the achieved TFLOP/s (the count is documented in `chunk_flops`), and the relative
   error of each one's outputs and six gradients against the recurrence's at that shape. The recurrence is timed
   as "reference-remat", its backward rematerialised per 64-step segment: the plain scan keeps every step's
   state, 130 GiB here.
2. stages: each of the seven Pallas kernels alone at the benchmark shape (float32 inputs, default settings with
   --stages-precision dots), with the TFLOP/s of the dots it runs (`stage_flops`), the GB/s of its arrays
   (`array_bytes`), and their sum against the whole forward+backward (the rest is layout: folding heads, padding,
   casts).
3. correctness: outputs, final state and all six gradients of pallas (each precision) and xla against a float64
   recurrence (run on the device with x64 enabled), float32 and bfloat16 inputs, with padded head dims and a
   partial last chunk. Exits non-zero if a bound is missed.
4. sweep (not run by default): settings one at a time (chunk size, the state-column block, Triton warps and
   stages, TF32 and bfloat16 dots, whole tiles against column blocks), pallas forward and forward+backward.
Each section is written to --out as soon as it finishes, so a cut-off run keeps what it measured.
"""

from __future__ import annotations

import argparse
import functools
import inspect
import sys
import traceback
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from bench_gated_delta import benchmark, compiled, make_inputs
from common import write_record

from sleeplm.cli.timing import median_seconds
from sleeplm.ops import gated_delta_rule, register_implementation
from sleeplm.ops.reference import gated_delta_rule_reference

ARGS = ("q", "k", "v", "g", "beta", "initial_state")
# Relative RMS error against the float64 recurrence, by input dtype or dot precision (the coarser of the two counts).
BOUNDS = {"float32": 1e-4, "tf32": 2e-3, "bfloat16": 2e-2}


def chunk_flops(batch: int, length: int, heads: int, d_k: int, d_v: int, chunk: int) -> float:
    """Matmul flops of the chunkwise forward (docs/method.md), excluding the in-chunk triangular inverse and decays:
    K K^T, W and U, the state pass (W S and K^T V'), and the outputs (Q S, Q K^T and the masked product with V').
    Forward+backward is counted as 3x this, the usual convention."""
    intra = 2 * chunk * chunk * (d_k + d_k + d_v)  # K K^T, W, U
    state = 2 * chunk * d_k * d_v * 2  # W S, K^T V'
    output = 2 * chunk * d_k * d_v + 2 * chunk * chunk * (d_k + d_v)  # Q S, Q K^T, (.) V'
    per_chunk = intra + state + output
    return batch * heads * (length / chunk) * per_chunk


def remat_reference(q, k, v, g, beta, initial_state, chunk_size=None, segment: int = 64):
    """The recurrence, scanned over segments of `segment` steps whose backward is rematerialised (`jax.checkpoint`):
    the same arithmetic as the reference, with the memory of one segment's steps instead of all of them."""
    batch, length = q.shape[:2]
    if length % segment:
        return gated_delta_rule_reference(q, k, v, g, beta, initial_state)

    @jax.checkpoint
    def step(state, segment_inputs):
        out, state = gated_delta_rule_reference(*segment_inputs, state)
        return state, out

    split = lambda x: jnp.moveaxis(x.reshape(batch, length // segment, segment, *x.shape[2:]), 1, 0)
    final, out = jax.lax.scan(step, initial_state.astype(jnp.float32), tuple(map(split, (q, k, v, g, beta))))
    return jnp.moveaxis(out, 0, 1).reshape(*q.shape[:3], v.shape[-1]), final


PRECISIONS = ("auto", "float32", "tf32", "bfloat16")


def register_pallas_precisions() -> None:
    """Registers pallas-P, the Pallas kernels with precision=P, for each of PRECISIONS."""
    from pallas_kernels.gated_delta import gated_delta_rule_pallas

    for precision in PRECISIONS:
        name, fn = f"pallas-{precision}", functools.partial(gated_delta_rule_pallas, precision=precision)
        register_implementation(name, fn, per_shard=True)


def relative_error(actual, expected) -> float:
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return float(np.sqrt(np.mean((actual - expected) ** 2)) / max(np.sqrt(np.mean(expected**2)), 1e-30))


def outputs_and_grads(implementation: str, inputs: tuple, cotangents: tuple, chunk: int) -> list[np.ndarray]:
    def loss(*args):
        out, state = gated_delta_rule(*args, implementation=implementation, chunk_size=chunk)
        return jnp.sum(out.astype(cotangents[0].dtype) * cotangents[0]) + jnp.sum(state * cotangents[1]), (out, state)

    (_, (out, state)), grads = jax.jit(jax.value_and_grad(loss, argnums=tuple(range(6)), has_aux=True))(*inputs)
    return [np.asarray(x, np.float64) for x in (out, state, *grads)]


def check_correctness(chunk: int) -> dict:
    results, failures = {}, []
    for batch, length, heads, dim in [(2, 300, 4, 96)]:  # padded head dims, a partial last chunk
        for dtype in ("float32", "bfloat16"):
            inputs = make_inputs(batch, length, heads, dim, jnp.dtype(dtype))
            keys = jax.random.split(jax.random.key(1), 2)
            cotangents = (
                jax.random.normal(keys[0], (batch, length, heads, dim)),
                jax.random.normal(keys[1], (batch, heads, dim, dim)),
            )
            with jax.enable_x64(True):  # the gold: the recurrence in float64 on the inputs as given
                gold = outputs_and_grads(
                    "reference",
                    tuple(jnp.asarray(np.asarray(x, np.float32), jnp.float64) for x in inputs),
                    tuple(jnp.asarray(np.asarray(c), jnp.float64) for c in cotangents),
                    chunk,
                )
            for implementation in ("pallas", "pallas-tf32", "pallas-bfloat16", "xla"):
                bound = max(BOUNDS[dtype], BOUNDS.get(implementation.removeprefix("pallas-"), 0.0))
                actual = outputs_and_grads(implementation, inputs, cotangents, chunk)
                errors = {
                    name: relative_error(a, b)
                    for name, a, b in zip(("out", "final_state", *(f"d{n}" for n in ARGS)), actual, gold, strict=True)
                }
                key = f"{implementation} B={batch} T={length} H={heads} d={dim} {dtype}"
                results[key] = errors
                worst = max(errors.values())
                failures += [key] if not worst < bound else []
                print(f"correctness {key}: worst relative error {worst:.2e} (bound {bound:.0e})", flush=True)
    return {"errors": results, "bounds": BOUNDS, "failures": failures}


def time_implementations(args: argparse.Namespace, results: dict, save) -> dict:
    """Times each implementation, and checks at the benchmark shape that its outputs and gradients agree with the
    recurrence's (float32). Fills `results` one measurement at a time, calling `save` after each."""
    flops = chunk_flops(args.batch, args.length, args.heads, args.dim, args.dim, args.chunk)
    for dtype in ("float32", "bfloat16"):
        inputs = make_inputs(args.batch, args.length, args.heads, args.dim, jnp.dtype(dtype))
        produced = {}
        for implementation in args.implementations.split(","):
            key = f"{implementation} {dtype}"
            repeats = min(args.repeats, 3) if implementation.startswith("reference") else args.repeats  # ~1 s each
            try:
                forward, forward_backward = compiled(implementation, args.chunk)
                produced[implementation] = [
                    np.asarray(x, np.float32) for x in (*forward(*inputs), *forward_backward(*inputs)[1])
                ]
                timing = {
                    "forward_s": median_seconds(forward, *inputs, repeats=repeats, warmup=False),
                    "forward_backward_s": median_seconds(forward_backward, *inputs, repeats=repeats, warmup=False),
                }
            except Exception as error:  # one implementation failing must not lose the others
                traceback.print_exc()
                results[key] = {"error": f"{type(error).__name__}: {error}"}
                save()
                continue
            timing["forward_tflops"] = flops / timing["forward_s"] / 1e12
            timing["forward_backward_tflops"] = 3 * flops / timing["forward_backward_s"] / 1e12
            results[key] = timing
            save()
            print(
                f"{implementation:<16}{dtype:<10} fwd {1e3 * timing['forward_s']:9.2f} ms "
                f"({timing['forward_tflops']:6.2f} TFLOP/s)  fwd+bwd {1e3 * timing['forward_backward_s']:9.2f} ms "
                f"({timing['forward_backward_tflops']:6.2f} TFLOP/s)",
                flush=True,
            )
        for implementation in args.implementations.split(","):
            mine, xla = results[f"{implementation} {dtype}"], results.get(f"xla {dtype}", {})
            if "forward_s" in mine and "forward_s" in xla:
                mine["forward_speedup_over_xla"] = xla["forward_s"] / mine["forward_s"]
                mine["forward_backward_speedup_over_xla"] = xla["forward_backward_s"] / mine["forward_backward_s"]
                print(
                    f"{implementation:<16}{dtype:<10} vs xla: fwd {mine['forward_speedup_over_xla']:.2f}x, "
                    f"fwd+bwd {mine['forward_backward_speedup_over_xla']:.2f}x",
                    flush=True,
                )
            gold = produced.get("reference-remat")
            if implementation in produced and gold is not None and implementation != "reference-remat":
                names = ("out", "final_state", *(f"d{n}" for n in ARGS))
                pairs = zip(names, produced[implementation], gold, strict=True)
                agreement = {n: relative_error(a, b) for n, a, b in pairs}
                mine["relative_error_vs_reference"] = agreement
                print(
                    f"{implementation:<16}{dtype:<10} worst relative error vs reference {max(agreement.values()):.2e}"
                )
        save()
    return results


def stage_flops(chunk: int, d_k: int, d_v: int) -> dict[str, float]:
    """Flops (2 x multiply-adds) of the dots each kernel runs per chunk, as written in chunk.py, with its doubling
    inverse (2 (ceil(log2 C) - 1) C x C products) and the 0/1 matmul of each decay matrix (C^3) included: what the
    kernels execute, unlike `chunk_flops`' algorithmic count."""
    c = chunk
    cube, square_k, square_v, state = c**3, c * c * d_k, c * c * d_v, c * d_k * d_v
    doubling = 2 * max(0, (c - 1).bit_length() - 1) * cube
    macs = {
        "wy_forward": cube + doubling + 2 * square_k + square_v,  # decays, K K^T, the inverse, W, U
        "states_forward": 2 * state,  # W S, K^T V'
        "output_forward": cube + square_k + state + square_v,  # decays, Q K^T, Q S, scores V'
        "wy_from_inverse": square_k + square_v,  # W, U
        "output_backward": 2 * cube + 3 * square_k + 2 * square_v + state,  # Gamma, dg; Q K^T, dQ, dK; dS, dV'; dO S^T
        "states_backward": 5 * state,  # K dS, V' dS^T, dV' S^T, W^T dV', (gamma Q)^T dO
        "wy_backward": 4 * cube + 5 * square_k + 2 * square_v,  # decays, K K^T, dA, dL, dR, (G + G^T) K, dg's 0/1
    }
    return {name: 2.0 * count for name, count in macs.items()}


def array_bytes(inputs, outputs) -> int:
    """Bytes of a kernel's input and output arrays, each counted once: a lower bound on its memory traffic (the
    sequential kernels read K, W and Q once per state-column block)."""
    return sum(x.nbytes for x in jax.tree.leaves((inputs, outputs)))


def time_stages(args: argparse.Namespace) -> dict:
    """Each Pallas kernel alone on the folded benchmark inputs (float32, default settings but --stages-precision),
    in the order the forward+backward runs them (the backward reruns states after W and U from the stored
    inverses), with the TFLOP/s of the dots it executes (`stage_flops`), the GB/s of its arrays (`array_bytes`:
    a lower bound on its memory traffic), and the whole forward+backward."""
    from pallas_kernels.gated_delta import gated_delta_rule_pallas
    from pallas_kernels.gated_delta.lowered import STAGE_KERNELS, run_every_kernel
    from pallas_kernels.gated_delta.ops import fold_inputs

    inputs = make_inputs(args.batch, args.length, args.heads, args.dim, jnp.float32)
    parameters = inspect.signature(gated_delta_rule_pallas).parameters.values()
    settings = {p.name: p.default for p in parameters if p.kind is inspect.Parameter.KEYWORD_ONLY}
    settings["interpret"] = jax.default_backend() == "cpu"  # a dry run of the script on CPU
    settings["layout"] = "cpu" if settings["interpret"] else jax.default_backend()
    settings["precision"] = args.stages_precision
    folded, config = fold_inputs(*inputs, chunk_size=args.chunk, **settings)
    # Each kernel jitted once (config static): the calls that make the next stage's inputs also compile it for timing.
    jitted = {name: jax.jit(functools.partial(fn, config=config)) for name, fn in STAGE_KERNELS.items()}
    arguments, traffic = {}, {}

    def call(name, *args):
        arguments[name] = args
        outputs = jitted[name](*args)
        traffic[name] = array_bytes(args, outputs)
        return outputs

    cotangent = lambda x, seed: jax.random.normal(jax.random.key(seed), x.shape, x.dtype)
    q, v, s0 = folded[0], folded[2], folded[-1]
    run_every_kernel(call, config.chunk, *folded, cotangent(v, 1), cotangent(s0, 2))
    chunks = q.shape[0] * q.shape[1] / config.chunk
    flops = stage_flops(config.chunk, q.shape[-1], v.shape[-1])
    results = {}
    for name, stage in jitted.items():
        seconds = median_seconds(stage, *arguments[name], repeats=args.repeats)
        tflops, gbps = chunks * flops[name] / seconds / 1e12, traffic[name] / seconds / 1e9
        results[name] = {"seconds": seconds, "tflops": tflops, "array_bytes": traffic[name], "array_gbps": gbps}
        print(f"stage {name:<16}: {1e3 * seconds:8.2f} ms  {tflops:7.2f} TFLOP/s  {gbps:8.1f} GB/s", flush=True)
    # forward+backward runs states twice (the backward recomputes it); the rest once each
    kernels = sum(r["seconds"] for r in results.values()) + results["states_forward"]["seconds"]
    whole = benchmark(f"pallas-{args.stages_precision}", inputs, args.chunk, args.repeats)["forward_backward_s"]
    results |= {"kernels_in_forward_backward_s": kernels, "forward_backward_s": whole}
    print(f"stage sum in fwd+bwd: {1e3 * kernels:8.2f} ms of {1e3 * whole:8.2f} ms for the whole", flush=True)
    return results


# One setting changed at a time from the defaults (chunk 64, block_v 64: the state-column block and the parallel
# kernels' column block, Triton's warps, one stage, float32-level dots for these float32 inputs).
SWEEP = (  # most telling first: a run cut off by its time limit keeps those
    {},
    {"precision": "tf32"},  # one TF32 product per dot instead of three: what float32-level accuracy costs
    {"num_warps": 8},  # half the registers per thread: the backward kernels spill at 4 (README's static check)
    {"precision": "tf32", "num_warps": 8},
    {"precision": "tf32", "block_v": 128},  # whole (C, d) tiles in the parallel kernels (no column blocks)
    {"precision": "bfloat16"},  # the data dots on bfloat16 operands, as flash-linear-attention computes
    {"precision": "bfloat16", "num_warps": 8},
    {"block_v": 32, "num_stages": 2},  # smaller state blocks, software-pipelined loads in the chunk loops
    {"chunk": 32},
    {"chunk": 128},
    {"block_v": 128},
    {"precision": "tf32", "num_warps": 8, "block_v": 32, "num_stages": 2},
)


def sweep_settings(args: argparse.Namespace, results: dict, save) -> dict:
    """Pallas forward and forward+backward times under each of SWEEP's settings (float32 inputs), into `results`,
    calling `save` after each."""
    from pallas_kernels.gated_delta import gated_delta_rule_pallas
    from sleeplm.ops import IMPLEMENTATIONS, register_implementation

    inputs = make_inputs(args.batch, args.length, args.heads, args.dim, jnp.float32)
    default = IMPLEMENTATIONS["pallas"]
    try:
        for setting in SWEEP:
            name = " ".join(f"{key}={value}" for key, value in setting.items()) or "defaults"
            kernel_settings = {key: value for key, value in setting.items() if key != "chunk"}
            register_implementation(
                "pallas", functools.partial(gated_delta_rule_pallas, **kernel_settings), per_shard=True
            )
            try:
                timing = benchmark("pallas", inputs, setting.get("chunk", args.chunk), args.repeats)
            except Exception as error:  # one setting failing to compile must not lose the others
                traceback.print_exc()
                results[name] = {"error": f"{type(error).__name__}: {error}"}
                save()
                continue
            results[name] = timing
            save()
            print(
                f"sweep {name:<28}: fwd {1e3 * timing['forward_s']:8.2f} ms, "
                f"fwd+bwd {1e3 * timing['forward_backward_s']:8.2f} ms",
                flush=True,
            )
    finally:
        IMPLEMENTATIONS["pallas"] = default
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--chunk", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument(
        "--implementations",
        default="xla,pallas,pallas-tf32,pallas-bfloat16,reference-remat",
        help="xla first: ratios are to it; pallas-P is pallas with precision=P",
    )
    parser.add_argument("--stages-precision", default="tf32", choices=PRECISIONS, help="the stages section's dots")
    parser.add_argument("--sections", default="timing,stages,correctness", help="of timing,stages,correctness,sweep")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args()
    print(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}", flush=True)
    register_implementation("reference-remat", remat_reference)
    register_pallas_precisions()

    results, failed = {}, False
    sections = {
        "correctness": lambda: check_correctness(args.chunk),
        "timing": lambda: time_implementations(
            args, results.setdefault("timing", {}), lambda: write_record(args, results)
        ),
        "stages": lambda: time_stages(args),
        "sweep": lambda: sweep_settings(args, results.setdefault("sweep", {}), lambda: write_record(args, results)),
    }
    for name in args.sections.split(","):
        try:
            results[name] = sections[name]()
            failed |= bool(results[name].get("failures")) if name == "correctness" else False
        except Exception as error:  # a section that breaks must not lose the others' numbers
            traceback.print_exc()
            results[name] = {"error": f"{type(error).__name__}: {error}"}
            failed = True
        write_record(args, results)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
