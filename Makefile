# Every target creates (or reuses) .venv by itself.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-slow bench bench-gpu static-check reproduce-cpu lint clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(PY) -m sleeplm demo

# Whole files per worker, in both targets: a module-scoped fixture (test_parallel's 8-device subprocess, ~200 s) then
# runs once. The xdist_group marks that --dist loadgroup reads are ignored under pytest 9.2 (pytest-xdist issue 1386).
# A crashed worker ends the run (--max-worker-restart=0): after a restart under loadfile the run has been seen to hang.
test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile --max-worker-restart=0

# The slow checks, then the property tests again with ten times the examples (SLEEPLM_HYPOTHESIS, tests/conftest.py).
test-slow: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile --max-worker-restart=0 -m slow
	SLEEPLM_HYPOTHESIS=slow $(PY) -m pytest -q -n 2 --dist loadfile --max-worker-restart=0 tests/test_fuzz.py tests/test_fuzz_corpus.py

bench: $(STAMP)
	$(PY) benchmarks/bench_gated_delta.py --out benchmarks/results/gated_delta_cpu.json
	$(PY) benchmarks/bench_train.py --out benchmarks/results/train_rule110_cpu.json
	$(PY) benchmarks/bench_train.py --preset lm-cpu --passes 1,2 --batch 16 --out benchmarks/results/train_lm_cpu.json
	$(PY) benchmarks/bench_inference.py --out benchmarks/results/inference_cpu.json

# On a GPU machine (no venv: its preinstalled jax is used): correctness and pallas vs xla vs reference timings.
bench-gpu:
	$(PYTHON) -m pallas_kernels.gated_delta.bench --out pallas_kernels/gated_delta/results/gpu_bench.json

# Without a GPU: registers, spills and shared memory of each Pallas kernel, compiled offline for an H100 by the
# standalone Triton package (in its own venv, .venv-triton: its MLIR runtime stays out of jax's process).
TRITON_PY := .venv-triton/bin/python
static-check: $(STAMP)
	test -x $(TRITON_PY) || ($(PYTHON) -m venv .venv-triton && $(TRITON_PY) -m pip install --quiet triton)
	$(PY) -m pallas_kernels.gated_delta.static_check --triton-python $(TRITON_PY) \
		--out pallas_kernels/gated_delta/results/static_check.json

# The CPU-scale reproduction (experiments/RESULTS.md), figure by figure; finished runs are skipped on a rerun.
# First the N=1 learning rate (at t=3 and t=4; Muon 8e-3, the best at t=4, is run.py's default), then the depth where
# N=1 fails within 600 steps (t=4), then the sleep sweep and baselines there, Depo, arithmetic and language modelling
# on the standard library. Many hours on 2 cores.
# The first, untuned (2e-3) sweeps: add `--muon-lr 2e-3 --results experiments/results/untuned-lr2e-3`.
REPRODUCE := $(PY) experiments/run.py
reproduce-cpu: $(STAMP)
	$(REPRODUCE) rule110-lr-t3
	$(REPRODUCE) rule110-depth
	$(REPRODUCE) rule110-lr-t4
	$(REPRODUCE) rule110-sleep-t4
	$(REPRODUCE) rule110-baselines-t4
	$(REPRODUCE) rule110-depth-N2
	$(REPRODUCE) depo
	$(REPRODUCE) depo-1hop
	$(REPRODUCE) depo-2hops
	$(REPRODUCE) arith
	$(REPRODUCE) arith-1op
	$(REPRODUCE) arith-mix
	$(REPRODUCE) lm
	$(PY) experiments/budget.py experiments/results/depo-2hops/no-eviction depo --out experiments/results/budget/depo.json
	$(PY) experiments/budget.py experiments/results/arith-1op/no-eviction-ops0-1 arith --out experiments/results/budget/arith.json
	$(PY) experiments/report.py

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

clean:
	rm -rf $(VENV) .venv-triton .pytest_cache .ruff_cache
