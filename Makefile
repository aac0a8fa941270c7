# Quick start: `make demo` (set up + run the demo) and `make test` (set up + run the tests).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench setup clean

setup: $(STAMP)

# The CPU torch wheel goes in first, so resolving the package never pulls a CUDA build.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/asyncckpt demo

test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider

lint: $(STAMP)
	$(VENV)/bin/ruff check asyncckpt tests benchmarks
	$(VENV)/bin/ruff format --check asyncckpt tests benchmarks
	$(VENV)/bin/mypy asyncckpt

# the full suite against every alternative: JSON in benchmarks/results, plots in docs/img
bench: $(STAMP)
	$(PY) -m pip install -q -e '.[dev,bench]'
	$(PY) -m benchmarks.run --json benchmarks/results/run_cpu.json --plots docs/img

clean:
	rm -rf $(VENV) checkpoints .pytest_cache
