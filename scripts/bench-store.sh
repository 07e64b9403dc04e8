#!/usr/bin/env bash
# The broker on each store, as BENCHMARKS.md records it: the same boot storm against broker
# processes on SQLite ×1, PostgreSQL ×1 and PostgreSQL ×2 replicas (a throwaway cluster started
# here on a Unix socket, fsync on, removed at the end), one run each, one after the other.
#   bash scripts/bench-store.sh                 # 1,000 VMs at once on each store
#   SCALE=1 bash scripts/bench-store.sh         # also 100,000 registered VMs, 10,000 at once
#   VMS=500 bash scripts/bench-store.sh         # another storm size
# Prints one JSON line per run (attesta-sim load --json, abridged) and keeps the whole JSON in
# $OUT (default: target/bench-store).
set -euo pipefail
cd "$(dirname "$0")/.."
VMS=${VMS:-1000}
OUT=${OUT:-target/bench-store}
log() { printf '\033[1m[bench-store]\033[0m %s\n' "$*" >&2; }

pgbin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
if [ -z "$pgbin" ]; then
  echo "PostgreSQL is not installed (apt-get install postgresql, or bash scripts/setup.sh)" >&2
  exit 1
fi
log "building attesta-sim and attesta-kbs (release)"
cargo build --release --locked -q -p attesta-sim -p kbs
mkdir -p "$OUT"

pg=$(mktemp -d)
chown postgres: "$pg"
as_pg() { runuser -u postgres -- "$@"; }
as_pg "$pgbin/initdb" -A trust -U attesta -E UTF8 -D "$pg/data" >/dev/null
as_pg "$pgbin/pg_ctl" -w -D "$pg/data" -l "$pg/server.log" \
  -o "-c listen_addresses='' -k $pg -c max_connections=200" start >/dev/null
trap 'as_pg "$pgbin/pg_ctl" -w -m fast -D "$pg/data" stop >/dev/null 2>&1 || true; rm -rf "$pg"' EXIT
# A fresh database per run: each run registers its own vm-0, vm-1, ….
database() {
  "$pgbin/psql" -q "postgres://attesta@localhost/postgres?host=$pg" -c "CREATE DATABASE $1"
  echo "postgres://attesta@localhost/$1?host=$pg"
}

run() {
  local name=$1
  shift
  log "$name: attesta-sim load $*"
  target/release/attesta-sim load --json "$@" > "$OUT/$name.json"
  python3 - "$OUT/$name.json" "$name" <<'EOF'
import json, sys
j = json.load(open(sys.argv[1]))
print(json.dumps({
    "run": sys.argv[2], "store": j["store"], "replicas": j["replicas"],
    "vms": j["vms"], "registered": j.get("registered"),
    "released": j["released"], "failed": j["failed"],
    "releases_per_sec": round(j["releases_per_sec"], 1),
    "evidence_p99_ms": round(j["release_latency_ms"]["p99"], 1),
    "broker_cpu_us_per_release": round(j["broker_cpu_us"]["per_release"]),
    "broker_peak_rss_mib": j.get("broker_peak_rss_mib"),
}))
EOF
}

run sqlite-1 --vms "$VMS" --store sqlite
run postgres-1 --vms "$VMS" --store "$(database bench_pg1)"
run postgres-2 --vms "$VMS" --store "$(database bench_pg2)" --replicas 2
if [ "${SCALE:-}" = 1 ]; then
  run scale-postgres-1 --vms 10000 --registered 100000 --store "$(database bench_scale)"
fi
