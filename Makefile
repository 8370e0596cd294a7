# Two commands a new machine needs: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test lint typecheck pytest demo emulate clean bench bench-quick bench-redis

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

# Needs redis-server (.ci/setup.d/10-redis.sh); prints the table for the README (~1 min).
bench-redis: $(STAMP)
	$(BIN)/python benchmarks/redis_budget.py

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache
