#!/usr/bin/env bash
# A real Substrate runtime, offline: Chopsticks (npm) serving Rococo Asset Hub's chain spec on
# loopback (see tests/chain/package.json; the native sqlite build is skipped). Used by the
# billing and chain-intake tests and by the demo's chain scene. Installs nodejs/npm from the
# machine's own apt sources when missing.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v npm >/dev/null 2>&1; then
  echo "[chain-deps] installing nodejs and npm (for Chopsticks)"
  apt-get install -y -qq --no-install-recommends nodejs npm
fi
if [ ! -x tests/chain/node_modules/.bin/chopsticks ] || [ tests/chain/package-lock.json -nt tests/chain/node_modules ]; then
  echo "[chain-deps] installing Chopsticks (tests/chain)"
  (cd tests/chain && npm ci --ignore-scripts --no-audit --no-fund --loglevel=error)
fi
