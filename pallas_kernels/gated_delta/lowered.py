"""The seven kernels one at a time, in the order forward+backward runs them, and their lowered Triton modules.

`run_every_kernel` chains the kernels outside the `custom_vjp` (bench.py times each this way). Pallas lowers a
kernel to a Triton MLIR module before any GPU is involved, and prints it when the `pallas_call` has `debug=True`:
`triton_modules` exports all seven for `cuda` with that flag on any machine. Tests count their dots
(`bench.stage_flops` must match), and `static_check.py` compiles them with a standalone Triton to read registers,
spills and shared memory.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import re
from collections.abc import Callable

import jax
import jax.numpy as jnp

from pallas_kernels.gated_delta import kernel
from pallas_kernels.gated_delta.ops import decays_from_start, fold_inputs

_HEADER = "The Triton module for pallas_call "
_KERNEL_NAMES = re.compile(r"^_(\w+?)(?:_kernel)?\b")
_LOCATION = re.compile(r' (\[unknown\]|#loc\d+|"[^"\n]*"\(#loc\d+\))(?=[,)\n]|$)')
_DOT = re.compile(r"tt\.dot .*? : tensor<(\d+)x(\d+)x\w+> \* tensor<\d+x(\d+)x\w+>")


STAGE_KERNELS = {
    "wy_forward": functools.partial(kernel.wy_forward, with_inverse=True),
    "states_forward": kernel.states_forward,
    "output_forward": functools.partial(kernel.output_forward, out_dtype=jnp.float32),
    "wy_from_inverse": kernel.wy_from_inverse,
    "output_backward": kernel.output_backward,
    "states_backward": kernel.states_backward,
    "wy_backward": kernel.wy_backward,
}


def run_every_kernel(call: Callable[..., tuple], chunk: int, q, k, v, g, beta, to_end, s0, d_out, d_final) -> tuple:
    """Runs each of STAGE_KERNELS once as `call(name, *args)`, on folded inputs (`ops.fold_inputs`) and the
    cotangents of o and the final state, feeding each kernel the outputs of those before it: W and U recomputed
    from the inverses as `ops` does (the start states are the forward's, the values its rerun gives), dW's
    partial sums over state-column blocks summed. `chunk`: the kernels' chunk length."""
    w, u, inverse = call("wy_forward", k, v, g, beta)
    v_new, states, _ = call("states_forward", k, w, u, g, to_end, s0)
    call("output_forward", q, k, g, v_new, states)
    w, u = call("wy_from_inverse", inverse, k, v, g, beta)
    _, _, _, dv_new = call("output_backward", q, k, g, v_new, states, d_out)
    from_start = decays_from_start(g, chunk)
    du, dw, *_ = call("states_backward", q, k, w, g, from_start, to_end, v_new, states, dv_new, d_out, d_final)
    return call("wy_backward", inverse, k, v, g, beta, dw.sum(0), du)


def triton_modules(dim: int = 128, chunk: int = 64, **settings) -> dict[str, str]:
    """{kernel name: its Triton module} for one chunk of one head with d_k = d_v = `dim`, lowered for GPU with
    `gated_delta_rule_pallas`' keyword settings (block_v, num_warps, num_stages, precision)."""
    settings = {"block_v": 64, "num_warps": None, "num_stages": 1, "precision": "tf32"} | settings
    shapes = [(1, chunk, 1, dim)] * 3 + [(1, chunk, 1)] * 2 + [(1, 1, dim, dim)]
    zeros = [jnp.zeros(shape, jnp.float32) for shape in shapes]
    inputs, config = fold_inputs(*zeros, chunk_size=chunk, interpret=False, layout="gpu", **settings)
    config = dataclasses.replace(config, debug=True)

    def every_kernel(q, k, v, g, beta, to_end, s0):
        call = lambda name, *args: STAGE_KERNELS[name](*args, config=config)
        return run_every_kernel(call, config.chunk, q, k, v, g, beta, to_end, s0, jnp.zeros_like(v), s0)

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        jax.export.export(
            jax.jit(every_kernel),
            platforms=["cuda"],
            disabled_checks=[jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")],
        )(*inputs)
    modules = {}
    for section in printed.getvalue().split(_HEADER)[1:]:
        source, _, module = section.partition("\n")
        module = module.split("\nThe kernel jaxpr for pallas_call ")[0]  # the next kernel's debug print
        modules[_KERNEL_NAMES.match(source).group(1)] = _without_locations(module)
    return modules


def _without_locations(module: str) -> str:
    """The module as parseable MLIR: Pallas prints it with pretty, human-only source locations (`#loc` alias
    lines, and after each op or argument `[unknown]`, `#locN` or `"name"(#locN)`), which this drops."""
    lines = [line for line in module.splitlines() if not re.match(r"\s*(#loc|at #loc)", line)]
    return _LOCATION.sub("", "\n".join(lines)).strip() + "\n"


def dot_macs(module: str) -> int:
    """Multiply-adds of the dots in a Triton module (one program; a loop body counts once)."""
    return sum(int(m) * int(k) * int(n) for m, k, n in _DOT.findall(module))
