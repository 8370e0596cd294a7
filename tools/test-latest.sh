#!/usr/bin/env bash
# `make test-latest`: resolve the newest releases that pyproject.toml's ranges admit (uv.lock
# is not touched), install them into .venv-latest and run lint, typecheck and the tests there.
# It prints which packages differ from the lock. A failure is reported as a warning and exits
# 0, so it can run on a schedule without turning main red; STRICT=1 makes it exit 1.
set -uo pipefail
export LC_ALL=C  # sort and join must agree on the order
cd "$(dirname "$0")/.."
UV=${UV:?} PYTHON=${PYTHON:-python3}
LATEST=.venv-latest
mkdir -p .tools/latest
"$UV" pip compile --quiet --upgrade --all-extras pyproject.toml -o .tools/latest/requirements.txt || {
  echo "test-latest: WARNING: the newest releases do not resolve (see above)" >&2
  exit "${STRICT:+1}${STRICT:-0}"
}
"$UV" venv --quiet --allow-existing --python "$PYTHON" "$LATEST"
"$UV" pip install --quiet --python "$LATEST/bin/python" -r .tools/latest/requirements.txt -e .
"$UV" export --quiet --frozen --all-extras --no-hashes --no-emit-project --no-header \
  | grep '==' | sed 's/ *;.*//' | sort >.tools/latest/locked.txt
grep '==' .tools/latest/requirements.txt | sed 's/ *;.*//' | sort >.tools/latest/newest.txt
echo "test-latest: newest releases (for this Python) that differ from uv.lock:"
# The lock holds one version per Python where they differ (numpy for 3.11 and 3.12+):
# a package differs only when the newest is none of its locked versions.
awk -F'==' 'NR == FNR {have[$0] = 1; locked[$1] = locked[$1] " " $2; next}
  ($1 in locked) && !($0 in have) {printf "  %s%s -> %s\n", $1, locked[$1], $2; n++}
  END {if (!n) print "  (none)"}' .tools/latest/locked.txt .tools/latest/newest.txt
failed=()
"$LATEST/bin/ruff" check dispatcher tests benchmarks || failed+=(ruff)
"$LATEST/bin/ruff" format --check dispatcher tests benchmarks || failed+=("ruff format")
"$LATEST/bin/mypy" || failed+=(mypy)
"$LATEST/bin/pytest" || failed+=(pytest)
if [ ${#failed[@]} -eq 0 ]; then
  echo "test-latest: the newest releases pass lint, typecheck and the tests"
  exit 0
fi
echo "test-latest: WARNING: the newest releases fail: ${failed[*]} (main uses uv.lock and is not affected)" >&2
[ -n "${STRICT:-}" ] && exit 1
exit 0
