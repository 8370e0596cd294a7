# Two commands a new machine needs: `make demo` and `make test`. `make help` lists the rest.
# Every install comes from uv.lock (exact versions, hashes checked); see README "Development".
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# The pinned uv (tools/uv-requirements.txt): the one on PATH when it is that version, else a
# private copy in .tools/uv, installed with pip --require-hashes (never into a global env).
UV_VERSION := 0.13.9
UV_PRIVATE := .tools/uv/bin/uv
UV ?= $(shell [ "$$(uv --version 2>/dev/null | cut -d' ' -f2)" = "$(UV_VERSION)" ] && command -v uv || echo $(UV_PRIVATE))
# The machine's python3 builds the venv; uv never downloads an interpreter of its own.
export UV_PYTHON_DOWNLOADS := never
export UV_PROJECT_ENVIRONMENT := $(VENV)
SYNC := $(UV) sync --frozen --all-extras --python $(PYTHON)

.PHONY: help install verify-install check-lock lock upgrade test lint typecheck pytest test-latest demo \
	emulate clean bench bench-quick bench-rate bench-rate-discovery bench-targets bench-redis

help: ## list the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-z][a-zA-Z_-]*:.*## / {printf "  make %-14s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

$(UV_PRIVATE): tools/uv-requirements.txt
	$(PYTHON) -m venv .tools/uv
	.tools/uv/bin/pip install --quiet --disable-pip-version-check --require-hashes --no-deps \
		-r tools/uv-requirements.txt
	touch $@

# A venv that matches uv.lock exactly (extras included: test, plot, speed, bench, redis).
$(STAMP): uv.lock pyproject.toml | $(UV)
	@bash tools/check-lock.sh $(UV)
	$(SYNC) --quiet
	touch $(STAMP)

install: $(STAMP) ## create .venv from uv.lock (exact versions, hashes checked)

verify-install: $(STAMP) ## check that .venv holds exactly the versions in uv.lock
	$(SYNC) --check

check-lock: | $(UV) ## fail with one line when pyproject.toml and uv.lock disagree
	@bash tools/check-lock.sh $(UV)

lock: | $(UV) ## re-resolve uv.lock after editing pyproject.toml (keeps locked versions that still fit)
	$(UV) lock --python $(PYTHON)

upgrade: | $(UV) ## re-resolve uv.lock to the newest releases the ranges allow
	$(UV) lock --upgrade --python $(PYTHON)

lint: $(STAMP) ## ruff check and ruff format --check
	$(BIN)/ruff check dispatcher tests benchmarks
	$(BIN)/ruff format --check dispatcher tests benchmarks

typecheck: $(STAMP) ## mypy --strict
	$(BIN)/mypy

pytest: $(STAMP) ## the test suite
	$(BIN)/pytest

test: lint typecheck pytest ## lint, typecheck and the test suite (what CI runs)

# Not part of CI: the newest releases in .venv-latest, to see upstream breakage early.
test-latest: | $(UV) ## lint, typecheck and tests against the newest releases (a warning, not a failure)
	@UV=$(UV) PYTHON=$(PYTHON) bash tools/test-latest.sh

demo: $(STAMP) ## create 1,000 instances, send to the waiting ones, verify: embedded emulator, no credentials
	$(BIN)/dispatcher demo

emulate: $(STAMP) ## run the emulator on 127.0.0.1
	$(BIN)/dispatcher emulate

# Installs nginx and wrk with apt-get if missing; writes its section of BENCHMARKS.md
# (~30 min at 100k events x 3 rounds; bench-quick: one round of 20k events, the two ratios
# dispatcher / lean and dispatcher / typical on both loops printed, BENCHMARKS.md untouched).
bench: $(STAMP) ## speed against hand-written clients, writes BENCHMARKS.md (~30 min)
	$(BIN)/python benchmarks/run.py

bench-quick: $(STAMP) ## dispatcher / lean and / typical on both loops, one round (~2-4 min)
	$(BIN)/python benchmarks/run.py --quick

bench-rate: $(STAMP) ## told R and auto against nginx limit_req, R 5/20/200/500, bursts 0/5/20, 30-s runs, and at 20/200 with a 50-ms round trip (~30 min)
	$(BIN)/python benchmarks/strict_limit.py --seconds 30 --write BENCHMARKS.md
	$(BIN)/python benchmarks/strict_limit.py --seconds 30 --limits 20,200 --rtt 50 --write BENCHMARKS.md

bench-rate-discovery: $(STAMP) ## --rate auto against nginx limit_req and the emulator (~10 min)
	$(BIN)/python benchmarks/rate_discovery.py --write BENCHMARKS.md

# Needs Node 22 and wrangler: bash .ci/setup.d/20-node-wrangler.sh
bench-targets: $(STAMP) ## events/s through the emulator, wrangler dev and the relay (~4 min)
	$(BIN)/python benchmarks/targets.py

# Needs redis-server (.ci/setup.d/10-redis.sh).
bench-redis: $(STAMP) ## the shared Redis budget across processes (~1 min)
	$(BIN)/python benchmarks/redis_budget.py

clean: ## remove .venv, .venv-latest, .tools/uv and the caches
	rm -rf $(VENV) .venv-latest .tools/uv .tools/latest .mypy_cache .pytest_cache .ruff_cache
