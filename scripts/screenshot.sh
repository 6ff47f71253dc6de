#!/usr/bin/env bash
# Makes the README's screenshot of the dashboard (docs/dashboard.png):
# starts the release build on a free port with an empty store, sends it a
# month of made-up traffic (scripts/demo_events.py), and has Chromium load
# the dashboard (tests/browser/dashboard.mjs, the test's own run).
# Installs Chromium and the npm packages when missing (scripts/lib.sh).
# EVTRACK_BIN names another build to use instead of the release one.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/lib.sh
ensure_browser
bin=${EVTRACK_BIN:-target/release/evtrack}
[ -n "${EVTRACK_BIN:-}" ] || cargo build --release --bin evtrack
dir=$(mktemp -d)
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
site=demo.example
# Goals, as an owner sets them (`evtrack sites set`), for the goals panel.
DATA_DIR="$dir" "$bin" sites set "$site" \
  '{"goals": [{"event": "Signup"}, {"page": "/pricing"}, {"page": "/blog/**"}]}' >/dev/null
PORT=$port DATA_DIR="$dir" "$bin" >"$dir/log" 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null; wait $pid 2>/dev/null; rm -rf "$dir"' EXIT
for _ in $(seq 100); do
  curl -fs "http://127.0.0.1:$port/ready" >/dev/null && break
  sleep 0.1
done
n=$(python3 scripts/demo_events.py "http://127.0.0.1:$port" "$site")
echo "sent $n events"
for _ in $(seq 100); do
  got=$(curl -fs "http://127.0.0.1:$port/api/v2/query" -H 'content-type: application/json' \
    -d "{\"site_id\":\"$site\",\"metrics\":[\"events\"],\"date_range\":\"all\"}" |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["results"][0]["metrics"][0])')
  [ "$got" = "$n" ] && break
  sleep 0.2
done
mkdir -p docs
node tests/browser/dashboard.mjs "http://127.0.0.1:$port/dashboard/$site" Europe/Berlin docs/dashboard.png >/dev/null
echo "wrote docs/dashboard.png"
