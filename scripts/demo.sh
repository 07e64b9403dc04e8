#!/usr/bin/env bash
# The main job: the whole system on this machine (`attesta-sim demo`: a mesh with two
# lighthouses, a key broker on it, host agents creating simulated SEV-SNP VMs with real LUKS2
# images booted twice, attested guests joining the mesh with broker-issued identities and reaching
# their own tenant only, a terminated VM denied and revoked, attacks against the live broker;
# and a real VM — Debian's cloud kernel under QEMU, created by a host agent on qemu:///system
# from an attesta-image image, dm-crypt in the guest and a simulated PSP; a Substrate runtime
# under Chopsticks from which the first miner takes a VM task), then the verifier over every
# real report in the corpus.
#   VMS=16 bash scripts/demo.sh        # more simulated VMs (default 8)
#   REAL_VMS=0 bash scripts/demo.sh    # no real VMs (default 1)
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

log "building attesta-kbs, attesta-sim, attesta-image, attesta-guest and attesta-verify (release)"
# attesta-guest with the simulator feature: the demo's real VMs take their reports from the
# simulated PSP (a production image is built without it).
cargo build --release --locked -p kbs -p attesta-sim -p attesta-image -p guest-agent \
  -p attesta-verify --features guest-agent/simulator --quiet
KBS=target/release/attesta-kbs
SIM=target/release/attesta-sim

log "the chain (Chopsticks on loopback: the first miner takes a VM task from it and records lifecycle there)"
bash scripts/chain-deps.sh

log "S3 storage (Garage on loopback: a real VM is backed up there and restored on the other host)"
bash scripts/s3-deps.sh
export ATTESTA_GARAGE=/var/cache/attesta/garage/bin/garage

if [ "${REAL_VMS:-1}" != 0 ]; then
  log "libvirt's daemons (the real VMs' host agent drives qemu:///system)"
  bash scripts/libvirt-up.sh
  log "the guest kernel (Debian's cloud kernel, unpacked, not installed)"
  ATTESTA_GUEST_KERNEL="${ATTESTA_GUEST_KERNEL:-$(bash scripts/guest-kernel.sh)}"
  export ATTESTA_GUEST_KERNEL
fi

log "the simulated fleet and ${REAL_VMS:-1} real VM(s) (attesta-sim demo --vms ${VMS:-8} --real-vms ${REAL_VMS:-1})"
"$SIM" demo --vms "${VMS:-8}" --real-vms "${REAL_VMS:-1}"

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

