#!/usr/bin/env bash
# The whole test suite. On a fresh Debian 12 machine, as root: installs what it needs first.
#   bash scripts/test.sh            # everything CI runs
#   FUZZ_SECONDS=60 bash scripts/test.sh   # longer fuzz smoke runs
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
log() { printf '\033[1m[test]\033[0m %s\n' "$*"; }

bash scripts/setup.sh
bash scripts/apt-mirror-test.sh

export ATTESTA_SNP_CORPUS="${ATTESTA_SNP_CORPUS:-$ROOT/../shared/snp-corpus}"
if [ ! -f "$ATTESTA_SNP_CORPUS/MANIFEST.md" ]; then
  if [ "${CI:-}" = "true" ]; then
    echo "SNP corpus not found at $ATTESTA_SNP_CORPUS (required when CI=true)" >&2
    exit 1
  fi
  log "SNP corpus not found at $ATTESTA_SNP_CORPUS: corpus tests will be skipped"
fi
# Debian's cloud kernel, unpacked (not installed), for the tests that boot real VMs under QEMU.
# Without it those tests skip (and fail when CI=true, saying so).
if [ -z "${ATTESTA_GUEST_KERNEL:-}" ]; then
  if ATTESTA_GUEST_KERNEL=$(bash scripts/guest-kernel.sh); then
    export ATTESTA_GUEST_KERNEL
    log "guest kernel: $ATTESTA_GUEST_KERNEL"
  else
    log "no guest kernel could be fetched: the real-VM tests will skip"
    unset ATTESTA_GUEST_KERNEL
  fi
fi
# A Debian 12 tree with initramfs-tools and dracut, for the test that proves attesta's hook and
# dracut module by booting the initramfs images they generate.
if [ -z "${ATTESTA_DISTRO_ROOT:-}" ]; then
  if ATTESTA_DISTRO_ROOT=$(bash scripts/distro-root.sh); then
    export ATTESTA_DISTRO_ROOT
    log "distro tree: $ATTESTA_DISTRO_ROOT"
  else
    log "no distro tree could be built: the distro-initramfs test will skip"
    unset ATTESTA_DISTRO_ROOT
  fi
fi
# libvirt's QEMU driver for the host agent's real VMs (qemu:///system).
if bash scripts/libvirt-up.sh; then
  log "libvirt: qemu:///system reachable"
else
  log "libvirt not reachable: the host agent's real-VM test will skip (and fail when CI=true)"
fi
export CARGO_TERM_COLOR=never
# Incremental caches double the size of the debug target and buy nothing in a one-shot run.
export CARGO_INCREMENTAL=0
start=$(date +%s)
disk() { log "disk: $(df -h --output=avail . | tail -n 1 | tr -d ' ') free, target $(du -sh target 2>/dev/null | cut -f1)"; }
disk

# An independent verifier, to check the simulator's output against (virtee's snpguest).
if ! command -v snpguest >/dev/null 2>&1; then
  log "installing snpguest (independent SEV-SNP verifier, used by the simulator tests)"
  cargo install snpguest --locked --quiet
fi

# The reference launch-measurement tool, to check `attesta-sim measure` against.
if ! command -v sev-snp-measure >/dev/null 2>&1; then
  log "installing sev-snp-measure (reference launch-measurement tool) from PyPI"
  python3 -m pip install --quiet --disable-pip-version-check 'sev-snp-measure==0.0.13'
fi

# A real Substrate runtime for the billing and chain-intake tests and the demo's chain.
bash scripts/chain-deps.sh
# A real S3 server (Garage) for the backup tests and the demo's backup scene.
bash scripts/s3-deps.sh
export ATTESTA_GARAGE=/var/cache/attesta/garage/bin/garage

log "format"
cargo fmt --all -- --check

log "production binaries do not depend on the simulator"
for p in kbs guest-agent host-agent mesh measure attesta-verify attesta-image; do
  if cargo tree -p "$p" -e normal --no-default-features --locked | grep -q '^[^ ]*simulator v\|[ ─]simulator v'; then
    echo "FAIL: $p depends on the simulator in a default build:" >&2
    cargo tree -p "$p" -e normal --no-default-features --locked -i simulator >&2 || true
    exit 1
  fi
done

log "clippy (all targets, warnings are errors)"
cargo clippy --workspace --all-targets --locked -- -D warnings

log "tests"
cargo test --workspace --locked
disk
if [ "${CI:-}" = "true" ]; then
  # A CI machine starts from nothing and its disk may be small: the debug build is not needed
  # by the benchmark (release) or fuzz (own target) builds that follow.
  rm -rf target/debug
fi

log "benchmarks compile and run once"
cargo bench --workspace --locked -- --test >/dev/null

if [ "${SKIP_FUZZ:-0}" != 1 ] && rustup toolchain list | grep -q nightly; then
  if ! command -v cargo-fuzz >/dev/null 2>&1; then
    log "installing cargo-fuzz"
    cargo install cargo-fuzz --locked --quiet
  fi
  secs="${FUZZ_SECONDS:-15}"
  log "fuzz smoke: ${secs}s per target"
  python3 fuzz/seed.py
  for t in $(cd fuzz && cargo +nightly fuzz list); do
    (cd fuzz && cargo +nightly fuzz run "$t" -- -max_total_time="$secs" -rss_limit_mb=2048 2>&1 | tail -n 2)
  done
else
  log "fuzz smoke skipped (no nightly toolchain or SKIP_FUZZ=1)"
fi

disk
log "all checks passed in $(( $(date +%s) - start ))s"
