#!/usr/bin/env bash
# Tests scripts/apt-mirror.sh on made-up apt configurations: the mirror is read from the
# machine's own sources (deb822 or one-line, options, proxies), never invented.
set -euo pipefail
here=$(dirname "$0")
fail=0
check() { # name, expected ("" = must fail), then files as path=content pairs
  local name=$1 want=$2 d; shift 2
  d=$(mktemp -d); mkdir -p "$d/sources.list.d"
  for pair in "$@"; do printf '%b' "${pair#*=}" >"$d/${pair%%=*}"; done
  local got rc=0
  got=$(bash "$here/apt-mirror.sh" "$d" 2>/dev/null) || rc=$?
  rm -rf "$d"
  if [ -z "$want" ] && [ "$rc" -ne 0 ]; then echo "ok   $name"; return; fi
  if [ -n "$want" ] && [ "$rc" -eq 0 ] && [ "$got" = "$want" ]; then echo "ok   $name"; return; fi
  echo "FAIL $name: got '$got' (exit $rc), want '${want:-failure}'"; fail=1
}
check "one-line list with options" "http://mirror.local/debian" \
  "sources.list=deb [signed-by=/k.gpg arch=amd64] http://mirror.local/debian bookworm main\n"
check "security suite is not the mirror" "http://m2/debian" \
  "sources.list=deb http://sec/debian-security bookworm-security main\ndeb http://m2/debian bookworm main\n"
check "deb822 behind a proxy" "http://proxy:3142/debian" \
  "sources.list.d/debian.sources=Types: deb\nURIs: http://proxy:3142/debian\nSuites: bookworm bookworm-updates\nComponents: main\n"
check "deb-src and disabled stanzas are skipped" "http://real/debian" \
  "sources.list.d/a.sources=Types: deb-src\nURIs: http://src/debian\nSuites: bookworm\n\nTypes: deb\nURIs: http://off/debian\nSuites: bookworm\nEnabled: no\n\nTypes: deb\nURIs: http://real/debian\nSuites: bookworm\n"
check "no bookworm source at all" "" \
  "sources.list.d/n.sources=Types: deb\nURIs: https://deb.nodesource.com/node_20.x\nSuites: nodistro\n"
check "nothing configured" ""
[ "$fail" = 0 ] && echo "apt-mirror: 6 passed, 0 failed" || { echo "apt-mirror: FAILED"; exit 1; }
