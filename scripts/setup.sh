#!/usr/bin/env bash
# Installs everything Attesta needs on a fresh Debian 12 (bookworm) machine, as root.
# Idempotent: safe to run again; each step is skipped when already done.
set -euo pipefail

log() { printf '\033[1m[setup]\033[0m %s\n' "$*"; }

if [ "$(id -u)" -ne 0 ]; then
  echo "setup.sh must run as root (it installs Debian packages)" >&2
  exit 2
fi

export DEBIAN_FRONTEND=noninteractive

# libvirt >= 10.5 is needed for SEV-SNP domains; bookworm ships 9.0, bookworm-backports ships 11.
# The suite is added on the mirror this machine already uses for bookworm (a local mirror or a
# proxy must keep working), never on a fixed host.
BPO=/etc/apt/sources.list.d/bookworm-backports.sources
if ! grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
  mirror=$(bash "$(dirname "$0")/apt-mirror.sh") || {
    echo "setup.sh: no Debian bookworm mirror found in /etc/apt/sources.list{,.d}; add bookworm-backports by hand" >&2
    exit 2
  }
  log "adding the bookworm-backports suite on $mirror"
  cat >"$BPO" <<SRC
Types: deb
URIs: $mirror
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
fi

STAMP=/var/lib/attesta-setup.stamp
PKGS=(pkg-config libssl-dev clang libclang-dev libcryptsetup-dev cryptsetup-bin
      libxml2-utils ovmf postgresql softhsm2 opensc python3-pip ca-certificates curl
      iproute2 iputils-ping busybox-static systemd-container)
# QEMU from backports too: its qemu-utils there breaks bookworm's qemu-system-common. The libvirt
# daemon packages are named one by one: the libvirt-daemon-system metapackage would upgrade systemd and udev.
# libvirt-daemon-driver-qemu needs systemd-container, which -t bookworm-backports would take from
# backports along with a newer systemd: bookworm's is installed first (above), which satisfies it.
BPO_PKGS=(libvirt-dev libvirt-clients qemu-utils qemu-system-x86
          libvirt-daemon libvirt-daemon-driver-qemu libvirt-daemon-common libvirt-daemon-log)

need_install=0
for p in "${PKGS[@]}" "${BPO_PKGS[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || { need_install=1; break; }
done
if [ "$need_install" = 1 ]; then
  log "apt-get update"
  apt-get update -qq
  log "installing: ${PKGS[*]}"
  apt-get install -y -qq --no-install-recommends "${PKGS[@]}"
  log "installing from bookworm-backports: ${BPO_PKGS[*]}"
  apt-get install -y -qq --no-install-recommends -t bookworm-backports "${BPO_PKGS[@]}"
fi
touch "$STAMP"

if ! command -v cargo >/dev/null 2>&1; then
  echo "cargo not found: install the Rust toolchain (rustup, stable >= 1.85) first" >&2
  exit 2
fi

log "toolchain: $(cargo --version)"
log "libvirt: $(pkg-config --modversion libvirt 2>/dev/null || echo 'not found')"
log "done"
