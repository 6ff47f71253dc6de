#!/usr/bin/env bash
# Runs the benchmark suite (see bench/README.md):
#   scripts/bench.sh           full run (well over half an hour on 2 cores; --large adds hours)
#   scripts/bench.sh --tiny    seconds, small sizes: checks the suite still works
# Installs what it needs when missing: wrk and redis-server (Debian packages,
# when run as root), SecantusDB in ./.venv-test and the original design's
# npm packages in bench/original (scripts/lib.sh); then
# builds the release binaries and runs `evtrack-bench run` with the arguments
# given here. Every server it starts is its own, on a free loopback port.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/lib.sh

ensure_commands wrk redis-server
ensure_postgres
ensure_original
unset EVTRACK_TEST_MONGO_URI # the benchmark always starts its own server
ensure_secantusdb

echo "==> cargo build --release --workspace"
cargo build --release --workspace
echo "==> target/release/evtrack-bench run $*"
exec target/release/evtrack-bench run "$@"
