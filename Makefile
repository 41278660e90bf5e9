# fedseek: `make demo` runs the default simulation, `make check` lint + types + the fast tests (< 3 min),
# `make test` everything CI runs (lint, types beside the tests, every test tier), `make bench` the benchmarks.
# Each target creates .venv when missing and installs fedseek with a CPU torch (constraints/cpu.txt).
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.fedseek-installed
# Test workers (pytest-xdist). Whole test files go to one worker (--dist loadfile), so a module's federation
# fixture starts once, in the order tests/conftest.py gives them (heaviest files first, so no long file runs alone at
# the end); 2 matches CI's 2 cores (the suite's simulations are CPU-bound: more workers only contend).
WORKERS ?= 2
PYTEST := $(BIN)/python -m pytest -q -n $(WORKERS) --dist loadfile --no-loadscope-reorder

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
	$(PYTEST) -m "not slow" tests

# mypy (~25 s on a clean checkout) runs beside the tests instead of before them; both must pass.
test: $(STAMP)
	$(BIN)/ruff check .
	@$(BIN)/mypy > .mypy-test.log 2>&1 & mypy_pid=$$!; \
	$(PYTEST) --durations=15 tests; tests_rc=$$?; \
	wait $$mypy_pid; mypy_rc=$$?; cat .mypy-test.log; rm -f .mypy-test.log; \
	test $$tests_rc -eq 0 -a $$mypy_rc -eq 0

bench: $(STAMP)
	@mkdir -p benchmarks/results
	@set -e; for b in benchmarks/*.py; do echo "== $$b"; $(BIN)/python $$b; done

clean:
	rm -rf runs .pytest_cache
