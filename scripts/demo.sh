#!/usr/bin/env bash
# The main job, until the simulated fleet exists: verify every real SEV-SNP report in the
# corpus (Milan, Genoa, Turin hardware) with the key broker's verifier and print a table.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
log() { printf '\033[1m[demo]\033[0m %s\n' "$*"; }

bash scripts/setup.sh

CORPUS="${ATTESTA_SNP_CORPUS:-$ROOT/../shared/snp-corpus}"
if [ ! -f "$CORPUS/MANIFEST.md" ]; then
  echo "SNP corpus not found at $CORPUS: set ATTESTA_SNP_CORPUS" >&2
  exit 2
fi

log "building attesta-kbs (release)"
cargo build --release --locked -p kbs --quiet
KBS=target/release/attesta-kbs

log "verifying every bundle in $CORPUS now (AMD roots built in, no network)"
"$KBS" verify-dir "$CORPUS" || log "note: the VLEK bundle's certificate expired on 2025-12-10, so it is rejected today"

log "the VLEK bundle inside its validity (2025-06-01):"
V="$CORPUS/trustee-milan-vlek"
"$KBS" verify-report "$V/report.bin" --vcek "$V/vlek.der" --chain "$V/cert_chain.pem" --at 2025-06-01T00:00:00Z

log "one report in full, as JSON (Turin):"
T="$CORPUS/msft-turin-v5"
"$KBS" verify-report "$T/report.bin" --vcek "$T/vcek.pem" --json
