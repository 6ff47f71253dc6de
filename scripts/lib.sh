# Shared by scripts/test.sh and scripts/bench.sh: installs what the project
# needs when it is missing. Source it from the repository root.

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

# ensure_commands CMD...: installs the Debian packages of the same names
# that are missing (wrk, redis-server).
ensure_commands() {
    local missing=()
    for c in "$@"; do
        command -v "$c" >/dev/null 2>&1 || missing+=("$c")
    done
    if [ "${#missing[@]}" -gt 0 ]; then
        apt_install "${missing[@]}"
    fi
}

# ensure_postgres: Debian's PostgreSQL server binaries (initdb, pg_ctl under
# /usr/lib/postgresql/<version>/bin), which the benchmark uses to start a
# server of its own as the reference for query-time aggregation.
ensure_postgres() {
    if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
        apt_install postgresql
    fi
}

# ensure_venv: ./.venv-test with the Python tools of scripts/requirements-test.txt
# (SecantusDB, schemathesis), every version pinned; reinstalled when that file
# changes.
ensure_venv() {
    local wanted="scripts/requirements-test.txt" stamp="$VENV/requirements-installed.txt"
    if [ ! -x "$VENV/bin/python" ]; then
        command -v python3 >/dev/null 2>&1 || apt_install python3 python3-venv
        echo "==> creating $VENV"
        if ! python3 -m venv "$VENV"; then # Debian's python3 needs python3-venv
            rm -rf "$VENV"
            apt_install python3-venv
            python3 -m venv "$VENV"
        fi
    fi
    if ! cmp -s "$wanted" "$stamp"; then
        echo "==> pip install -r $wanted into $VENV"
        "$VENV/bin/python" -m pip install --disable-pip-version-check --quiet -r "$wanted"
        cp "$wanted" "$stamp"
    fi
}

# ensure_secantusdb: SecantusDB, a MongoDB wire-protocol server from PyPI, in
# ./.venv-test; exports EVTRACK_SECANTUSD. Skipped when EVTRACK_TEST_MONGO_URI
# points at an existing server or EVTRACK_SECANTUSD already names one.
ensure_secantusdb() {
    if [ -n "${EVTRACK_TEST_MONGO_URI:-}" ]; then
        echo "==> using the external MongoDB in EVTRACK_TEST_MONGO_URI (no SecantusDB)"
    elif [ -n "${EVTRACK_SECANTUSD:-}" ]; then
        echo "==> using EVTRACK_SECANTUSD=$EVTRACK_SECANTUSD"
    else
        ensure_venv
        export EVTRACK_SECANTUSD="$PWD/$VENV/bin/secantusd-py"
    fi
}

# ensure_browser: Debian's Chromium (/usr/bin/chromium) and Node.js, and
# tests/browser's npm packages at the versions of its package-lock.json
# (playwright-core drives the browser; no browser is downloaded).
ensure_browser() {
    [ -x /usr/bin/chromium ] || apt_install chromium
    ensure_npm_packages tests/browser
}

# ensure_npm_packages DIR: Node.js, and DIR's npm packages at the versions of
# its package-lock.json (installed again only when the lock changed).
ensure_npm_packages() {
    local dir=$1
    command -v node >/dev/null 2>&1 && command -v npm >/dev/null 2>&1 || apt_install nodejs npm
    local lock=$dir/package-lock.json stamp=$dir/node_modules/.installed-lock.json
    if ! cmp -s "$lock" "$stamp"; then
        echo "==> npm ci in $dir"
        (cd "$dir" && npm ci --no-audit --no-fund --silent)
        cp "$lock" "$stamp"
    fi
}

# ensure_original: Node.js and bench/original's npm packages at the versions
# of its package-lock.json: the original design's API, a reference of the
# benchmark's ingest section.
ensure_original() {
    ensure_npm_packages bench/original
}

# ensure_schemathesis: schemathesis (API fuzzing against the OpenAPI document)
# in ./.venv-test; exports EVTRACK_SCHEMATHESIS unless already set.
ensure_schemathesis() {
    if [ -z "${EVTRACK_SCHEMATHESIS:-}" ]; then
        ensure_venv
        export EVTRACK_SCHEMATHESIS="$PWD/$VENV/bin/schemathesis"
    fi
}
