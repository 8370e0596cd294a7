# Two commands a new machine needs: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test lint typecheck pytest demo emulate clean bench bench-quick bench-rate

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

# --rate auto against nginx limit_req (no rate headers) and the emulator (headers), ~3 min.
bench-rate: $(STAMP)
	$(BIN)/python benchmarks/rate_discovery.py --write BENCHMARKS.md

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache
