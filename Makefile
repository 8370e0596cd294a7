# Two commands a new machine needs: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test lint typecheck pytest demo emulate clean bench bench-quick bench-rate bench-targets bench-redis

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

# The benchmark also needs uvloop (both loops are measured) and py-spy (the profile).
BENCH_STAMP := $(VENV)/.bench-installed

$(BENCH_STAMP): $(STAMP) pyproject.toml
	$(BIN)/pip install --quiet -e '.[test,speed,bench]'
	touch $(BENCH_STAMP)

# Installs nginx and wrk with apt-get if missing; writes its section of BENCHMARKS.md
# (~15 min; bench-quick: ~2 min, one round of 20k events, no 1M-record run).
bench: $(BENCH_STAMP)
	$(BIN)/python benchmarks/run.py

bench-quick: $(BENCH_STAMP)
	$(BIN)/python benchmarks/run.py --quick

# --rate auto against nginx limit_req (no rate headers) and the emulator (headers), ~10 min.
bench-rate: $(STAMP)
	$(BIN)/python benchmarks/rate_discovery.py --write BENCHMARKS.md

# Events/s and CPU per event through the emulator, wrangler dev and the relay in wrangler
# dev (~4 min); needs Node 22 and wrangler: bash .ci/setup.d/20-node-wrangler.sh
bench-targets: $(STAMP)
	$(BIN)/python benchmarks/targets.py

# Needs redis-server (.ci/setup.d/10-redis.sh); prints the table for the README (~1 min).
bench-redis: $(STAMP)
	$(BIN)/python benchmarks/redis_budget.py

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache
