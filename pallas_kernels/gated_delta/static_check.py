"""Registers, spills and shared memory of each GPU kernel, read on a machine without a GPU.

    make static-check   # installs triton into .venv-triton once, then runs this with --triton-python there
    python -m pallas_kernels.gated_delta.static_check [--precisions float32,tf32,bfloat16] [--warps 4,8]
        [--triton-python PYTHON] [--out FILE]

The kernels are lowered to Triton modules here (`lowered.triton_modules`, d = 128, chunk 64, block_v 64), then a
subprocess compiles each with the standalone Triton package for an H100 (sm_90a, one pipelining stage, each
--warps) and runs the ptxas that Triton bundles with `-v`. What it prints is indicative, not what the GPU runs:
XLA compiles the kernels with its own Triton, whose layouts and shared-memory plan can differ. Spilled registers
and a shared-memory need above 227 KB (an H100's per-block limit) are what to look for.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

_PTXAS_INFO = re.compile(r"(\d+) bytes spill stores.*?Used (\d+) registers", re.S)


def compile_modules(directory: Path, warps: list[int]) -> list[dict]:
    """Compiles every `*.ttir` in `directory` (run in the process that imports triton, not jax)."""
    import triton
    from triton.backends.compiler import GPUTarget

    bin_dir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    ptxas = next(p for p in (bin_dir / "ptxas-blackwell", bin_dir / "ptxas") if p.exists())  # the newer PTX ISA first
    rows = []
    for path in sorted(directory.glob("*.ttir")):
        for count in warps:
            compiled = triton.compile(
                str(path), target=GPUTarget("cuda", 90, 32), options={"num_warps": count, "num_stages": 1}
            )
            ptx = path.with_suffix(f".w{count}.ptx")
            ptx.write_text(compiled.asm["ptx"])
            info = subprocess.run(
                [str(ptxas), "-v", "--gpu-name", "sm_90a", str(ptx), "-o", str(ptx.with_suffix(".cubin"))],
                capture_output=True,
                text=True,
                check=True,
            ).stderr
            spills, registers = map(int, _PTXAS_INFO.search(info).groups())
            precision, kernel = path.stem.split("-", 1)
            rows.append(
                {
                    "kernel": kernel,
                    "precision": precision,
                    "num_warps": count,
                    "shared_memory_bytes": compiled.metadata.shared,
                    "registers_per_thread": registers,
                    "spill_store_bytes": spills,
                }
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--precisions", default="float32,tf32,bfloat16")
    parser.add_argument("--warps", default="4,8")
    parser.add_argument("--triton-python", default=sys.executable, help="a Python that can import triton")
    parser.add_argument("--compile-only", type=Path, help=argparse.SUPPRESS)  # the subprocess's entry
    parser.add_argument("--out", type=Path, help="write the rows as JSON here")
    args = parser.parse_args()
    warps = [int(w) for w in args.warps.split(",")]
    if args.compile_only:
        print(json.dumps(compile_modules(args.compile_only, warps)))
        return

    from pallas_kernels.gated_delta.lowered import triton_modules

    with tempfile.TemporaryDirectory() as directory:
        for precision in args.precisions.split(","):
            for kernel, module in triton_modules(precision=precision).items():
                (Path(directory) / f"{precision}-{kernel}.ttir").write_text(module)
        command = [args.triton_python, __file__, "--warps", args.warps]  # by path: the package's import needs jax
        environment = os.environ | {"TRITON_DEFAULT_FP_FUSION": "1"}  # Triton 3.9's default, set to silence its warning
        done = subprocess.run(
            [*command, "--compile-only", directory], capture_output=True, text=True, check=False, env=environment
        )
    if done.returncode:
        sys.exit(f"compiling with {args.triton_python} failed (is triton installed there?):\n{done.stderr[-3000:]}")
    rows = json.loads(done.stdout.splitlines()[-1])
    print(f"{'kernel':<16}{'precision':<10}{'warps':>6}{'smem KB':>9}{'regs':>6}{'spill B':>9}")
    for row in rows:
        print(
            f"{row['kernel']:<16}{row['precision']:<10}{row['num_warps']:>6}{row['shared_memory_bytes'] / 1024:>9.0f}"
            f"{row['registers_per_thread']:>6}{row['spill_store_bytes']:>9}"
        )
    if args.out:
        sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
        from common import write_record

        write_record(args, rows)


if __name__ == "__main__":
    main()
