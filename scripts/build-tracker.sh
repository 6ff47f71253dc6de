#!/usr/bin/env bash
# Minifies the tracker (assets/script.js -> assets/script.min.js) with the
# terser pinned in tests/browser/package-lock.json. The output is committed:
# `cargo build` needs no Node.js. Its first line records the SHA-256 of the
# source it was made from; a unit test fails when the source changed since.
set -euo pipefail
cd "$(dirname "$0")/.."
(cd tests/browser && npm ci --no-audit --no-fund --silent)
sum=$(sha256sum assets/script.js | cut -d' ' -f1)
min=$(tests/browser/node_modules/.bin/terser assets/script.js \
  --compress passes=3,unsafe_arrows=true --mangle --ecma 2020)
printf "/*! evtrack tracker, source sha256 %s */\n%s\n" "$sum" "$min" > assets/script.min.js
printf "assets/script.min.js: %s bytes, %s gzipped as served (without its first line)\n" "$(tail -n +2 assets/script.min.js | wc -c)" "$(tail -n +2 assets/script.min.js | gzip -9 | wc -c)"
