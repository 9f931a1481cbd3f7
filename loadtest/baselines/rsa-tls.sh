#!/usr/bin/env bash
# A throwaway RSA-2048 key and self-signed certificate for localhost, for benchmark
# runs only (a results directory, not kept in git).
#
#   loadtest/baselines/rsa-tls.sh DIR > server.toml
#
# Writes DIR/key.pem and DIR/cert.pem with openssl and prints the `[tls]` table
# that points a server at them (for `tutti-load run --server-config`). Fails, and
# prints nothing, when openssl cannot make them.
set -euo pipefail
[ $# = 1 ] || { echo "usage: rsa-tls.sh DIR" >&2; exit 2; }
dir=$(cd "$1" && pwd)
openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN=localhost \
  -keyout "$dir/key.pem" -out "$dir/cert.pem" 2>/dev/null
printf '[tls]\ncert = "%s"\nkey = "%s"\n' "$dir/cert.pem" "$dir/key.pem"
