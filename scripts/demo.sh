#!/usr/bin/env bash
# The main job: the whole system on this machine (`attesta-sim demo`: a mesh with two
# lighthouses, a key broker on it, host agents creating simulated SEV-SNP VMs with real LUKS2
# images booted twice, attested guests joining the mesh with broker-issued identities and reaching
# their own tenant only, a terminated VM denied and revoked, attacks against the live broker),
# then the verifier over every real report in the corpus.
#   VMS=16 bash scripts/demo.sh     # more VMs (default 8)
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

log "building attesta-kbs and attesta-sim (release)"
cargo build --release --locked -p kbs -p attesta-sim --quiet
KBS=target/release/attesta-kbs
SIM=target/release/attesta-sim

log "the simulated fleet (attesta-sim demo --vms ${VMS:-8})"
"$SIM" demo --vms "${VMS:-8}"

log "verifying every bundle in $CORPUS now (AMD roots built in, no network)"
"$KBS" verify-dir "$CORPUS" || log "note: the VLEK bundle's certificate expired on 2025-12-10, so it is rejected today"

log "the VLEK bundle inside its validity (2025-06-01):"
V="$CORPUS/trustee-milan-vlek"
"$KBS" verify-report "$V/report.bin" --vcek "$V/vlek.der" --chain "$V/cert_chain.pem" --at 2025-06-01T00:00:00Z

log "one report in full, as JSON (Turin):"
T="$CORPUS/msft-turin-v5"
"$KBS" verify-report "$T/report.bin" --vcek "$T/vcek.pem" --json

log "a simulated Genoa report: rejected without the simulator's root, accepted (not AMD-rooted) with it"
OUT=$(mktemp -d)
"$SIM" report --product genoa --report-data "$(printf 'ab%.0s' $(seq 64))" --out "$OUT"
"$KBS" verify-report "$OUT/report.bin" --vcek "$OUT/vcek.der" --ask "$OUT/ask.pem" --ark "$OUT/ark.pem" | head -1 || true
"$KBS" verify-report "$OUT/report.bin" --vcek "$OUT/vcek.der" --ask "$OUT/ask.pem" --ark "$OUT/ark.pem" --trust-root "$OUT/ark.pem" | head -1

