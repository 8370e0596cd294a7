# Two commands a new machine needs: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test lint typecheck pytest demo emulate clean bench bench-quick bench-targets

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check dispatcher tests benchmarks
	$(BIN)/ruff format --check dispatcher tests benchmarks

typecheck: $(STAMP)
	$(BIN)/mypy

pytest: $(STAMP)
	$(BIN)/pytest

test: lint typecheck pytest

demo: $(STAMP)
	$(BIN)/dispatcher demo

emulate: $(STAMP)
	$(BIN)/dispatcher emulate

# Installs nginx and wrk with apt-get if missing; writes BENCHMARKS.md (~10 min).
bench: $(STAMP)
	$(BIN)/python benchmarks/run.py

bench-quick: $(STAMP)
	$(BIN)/python benchmarks/run.py --quick

# Events/s through the emulator, wrangler dev and the relay in wrangler dev (~2 min);
# needs Node 22 and wrangler: bash .ci/setup.d/20-node-wrangler.sh
bench-targets: $(STAMP)
	$(BIN)/python benchmarks/targets.py

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache
