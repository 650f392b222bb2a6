# Every target creates (or reuses) .venv by itself.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-slow bench lint clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(PY) -m sleeplm demo

test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadgroup

test-slow: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadgroup -m slow

bench: $(STAMP)
	$(PY) benchmarks/bench_gated_delta.py --out benchmarks/results/gated_delta_cpu.json
	$(PY) benchmarks/bench_train.py --out benchmarks/results/train_rule110_cpu.json

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
