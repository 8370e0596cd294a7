#!/usr/bin/env bash
# Fails with one line when uv.lock no longer matches pyproject.toml (a range edited without
# `make lock`). Any other failure of `uv lock --check` (no network, a broken pyproject.toml)
# is reported as uv's own last line, so the two are not confused.
set -uo pipefail
uv=${1:?usage: check-lock.sh UV}
out=$("$uv" lock --check 2>&1)
status=$?
if [ $status -eq 0 ]; then
  exit 0
fi
if grep -qi "needs to be updated\|does not match\|out of date" <<<"$out"; then
  echo "uv.lock does not match pyproject.toml: run 'make lock' and commit uv.lock" >&2
else
  echo "uv lock --check failed: $(grep -v '^\s*$' <<<"$out" | tail -1)" >&2
fi
exit 1
