#!/usr/bin/env bash
# Python 3.11+ with venv for `make install`: Debian 12's python3 is 3.11 but ships the
# venv module (ensurepip) in a separate package. Nothing to do when both are there.
set -euo pipefail
ok() {
  command -v python3 >/dev/null 2>&1 &&
    python3 -c 'import sys; assert sys.version_info >= (3, 11)' 2>/dev/null &&
    python3 -c 'import ensurepip, venv' 2>/dev/null
}
if ok; then
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update
apt-get install -y --no-install-recommends python3 python3-venv python3-pip
ok || { echo "python3 >= 3.11 with venv is needed (found: $(python3 --version 2>&1))" >&2; exit 1; }
