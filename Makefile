# fedseek: `make demo` runs the default simulation, `make check` lint + types + the fast tests (< 3 min),
# `make test` everything CI runs (lint, types, every test tier), `make bench` the benchmarks.
# Each target creates .venv when missing and installs fedseek with a CPU torch (constraints/cpu.txt).
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.fedseek-installed

.PHONY: demo check lint test bench venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml constraints/cpu.txt
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check -c constraints/cpu.txt -e ".[test]" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }
	@touch $(STAMP)

demo: $(STAMP)
	$(BIN)/fedseek simulate simulations/hospitals.yaml --out runs/demo

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy

check: lint
	$(BIN)/python -m pytest -q -m "not slow" tests

test: lint
	$(BIN)/python -m pytest -q tests

bench: $(STAMP)
	@mkdir -p benchmarks/results
	@set -e; for b in benchmarks/*.py; do echo "== $$b"; $(BIN)/python $$b; done

clean:
	rm -rf runs .pytest_cache
