#!/usr/bin/env bash
# redis-server for the coordination tests (tests/test_redis_*.py start their own on a free
# port) and `make bench-redis`. Debian's package (7.0.x): XAUTOCLAIM, no XREADGROUP CLAIM.
set -euo pipefail
if command -v redis-server >/dev/null 2>&1; then
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update
apt-get install -y --no-install-recommends redis-server
# The package starts a system service on 6379; the tests never use it.
if command -v systemctl >/dev/null 2>&1; then
  systemctl disable --now redis-server >/dev/null 2>&1 || true
fi
