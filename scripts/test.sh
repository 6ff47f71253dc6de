#!/usr/bin/env bash
# Installs what the tests need, then runs fmt, clippy, the tests, and the
# benchmark suite in its tiny mode (seconds: it checks the suite still works;
# its figures mean nothing).
# The tests start their own backends on free ports (see tests/api/backends.rs):
#   - redis-server (Debian package; installed here when missing and we are root)
#   - SecantusDB, a MongoDB wire-protocol server from PyPI, in ./.venv-test;
#     skipped when EVTRACK_TEST_MONGO_URI points at an existing server (then no
#     server is spawned) or when EVTRACK_SECANTUSD already names a secantusd-py.
# and schemathesis (PyPI, ./.venv-test), which fuzzes the running API against
# its OpenAPI document (tests/api/openapi.rs); and for the browser test
# (tests/api/browser.rs) Debian's chromium with Node.js and the npm packages
# of tests/browser/package-lock.json (playwright-core, Plausible's tracker).
# The tiny benchmark runs the original design's API (bench/original: Node.js,
# npm packages of its package-lock.json).
# Extra arguments go to `cargo test`, e.g. scripts/test.sh -- --nocapture
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/lib.sh

ensure_commands redis-server wrk strace
ensure_postgres
ensure_secantusdb
ensure_schemathesis
ensure_browser
ensure_original

# DATA_DIR's default is ./data: a database committed there would be what
# `cargo run --release` starts on in a fresh clone.
if git rev-parse --git-dir >/dev/null 2>&1 && [ -n "$(git ls-files -- data)" ]; then
    echo "error: files under data/ are committed (git rm --cached them):" >&2
    git ls-files -- data >&2
    exit 1
fi

echo "==> cargo fmt --check"
cargo fmt --all --check
echo "==> cargo clippy --workspace --all-targets -- -D warnings"
cargo clippy --workspace --all-targets -- -D warnings
echo "==> cargo test --workspace $*"
cargo test --workspace "$@"

if [ -n "${EVTRACK_SECANTUSD:-}" ]; then
    echo "==> benchmark suite, tiny mode (debug build)"
    cargo build --workspace
    out=$(mktemp -d)
    # Bounded: it takes about a minute; a case that hangs fails the run
    # instead of holding it (the suite stops its children on SIGTERM).
    timeout --kill-after=30 900 \
        target/debug/evtrack-bench run --tiny --bin-dir target/debug --out "$out"
    rm -rf "$out"
else
    echo "==> benchmark tiny mode skipped: it needs SecantusDB (EVTRACK_SECANTUSD)"
fi
