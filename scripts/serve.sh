#!/usr/bin/env bash
# Starts a Tutti node on this machine for development: builds the web client (when
# npm is there) and the server, then runs `tutti serve --dev` with the embedded
# single-node defaults, development certificates and a generated token secret
# (loopback addresses only). Extra arguments go to `tutti serve`. A production node
# runs `tutti serve` with a configured secret instead (docs/OPERATIONS.md).
set -euo pipefail
cd "$(dirname "$0")/.."

if command -v npm >/dev/null 2>&1; then
  [ -d web/node_modules ] || npm --prefix web ci --no-audit --no-fund
  npm --prefix web run build >/dev/null
else
  echo "npm not found: the page at / needs the web client (apt-get install nodejs npm)" >&2
fi
exec cargo run --release --locked --bin tutti -- serve --dev "$@"
