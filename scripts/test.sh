#!/usr/bin/env bash
# Installs what the integration tests need, then runs fmt, clippy and the tests.
# The tests start their own backends on free ports (see tests/api/backends.rs):
#   - redis-server (Debian package; installed here when missing and we are root)
#   - SecantusDB, a MongoDB wire-protocol server from PyPI, in ./.venv-test;
#     skipped when EVTRACK_TEST_MONGO_URI points at an existing server (then no
#     server is spawned) or when EVTRACK_SECANTUSD already names a secantusd-py.
# Extra arguments go to `cargo test`, e.g. scripts/test.sh -- --nocapture
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

SECANTUSDB_VERSION=0.7.0b3
VENV=.venv-test

# apt_install PKG...: install Debian packages (root only) without letting their
# services auto-start (e.g. redis on 6379, which the tests don't use).
apt_install() {
    if [ "$(id -u)" -ne 0 ]; then
        echo "error: missing $*; install with: sudo apt-get install -y $*" >&2
        exit 1
    fi
    local policy=/usr/sbin/policy-rc.d added=""
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod +x "$policy" && added=1
        trap 'rm -f /usr/sbin/policy-rc.d' EXIT # also if the install fails
    fi
    echo "==> apt-get install $*"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update
    apt-get install -y --no-install-recommends "$@"
    if [ -n "$added" ]; then
        rm -f "$policy"
        trap - EXIT
    fi
}

command -v redis-server >/dev/null 2>&1 || apt_install redis-server

if [ -n "${EVTRACK_TEST_MONGO_URI:-}" ]; then
    echo "==> using the external MongoDB in EVTRACK_TEST_MONGO_URI (no SecantusDB)"
elif [ -n "${EVTRACK_SECANTUSD:-}" ]; then
    echo "==> using EVTRACK_SECANTUSD=$EVTRACK_SECANTUSD"
else
    if [ ! -x "$VENV/bin/python" ]; then
        command -v python3 >/dev/null 2>&1 || apt_install python3 python3-venv
        echo "==> creating $VENV"
        if ! python3 -m venv "$VENV"; then # Debian's python3 needs python3-venv
            rm -rf "$VENV"
            apt_install python3-venv
            python3 -m venv "$VENV"
        fi
    fi
    installed=$("$VENV/bin/python" -c \
        "import importlib.metadata as m; print(m.version('secantusdb'))" 2>/dev/null || true)
    if [ "$installed" != "$SECANTUSDB_VERSION" ]; then
        echo "==> pip install secantusdb==$SECANTUSDB_VERSION into $VENV"
        "$VENV/bin/python" -m pip install --disable-pip-version-check --quiet \
            "secantusdb==$SECANTUSDB_VERSION"
    fi
    export EVTRACK_SECANTUSD="$PWD/$VENV/bin/secantusd-py"
fi

echo "==> cargo fmt --check"
cargo fmt --check
echo "==> cargo clippy --all-targets -- -D warnings"
cargo clippy --all-targets -- -D warnings
echo "==> cargo test $*"
cargo test "$@"
