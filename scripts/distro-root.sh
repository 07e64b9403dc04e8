#!/usr/bin/env bash
# Builds a minimal Debian 12 (bookworm) system tree with both initramfs generators installed —
# initramfs-tools and dracut (systemd-based, with its network modules) — on the mirror this machine
# already uses, and prints its folder. The distro-initramfs test installs attesta's
# initramfs-tools hook and dracut module into it, generates an initramfs for Debian's cloud
# kernel inside it (chroot) and boots that under QEMU. A tree of its own, because the
# generators need udev, which this host cannot install beside backports' systemd libraries.
# Idempotent: a finished tree is reused (a `.attesta-complete` stamp marks it).
#   bash scripts/distro-root.sh [CACHE_DIR]   # default /var/cache/attesta/distro-root
set -euo pipefail
cache=${1:-/var/cache/attesta/distro-root}
dir="$cache/bookworm"
PKGS=initramfs-tools,dracut-core,dracut-network,systemd,systemd-sysv,udev,busybox,kmod,dmsetup,libcryptsetup12,iproute2,procps,dbus,zstd
if [ -f "$dir/.attesta-complete" ] && [ "$(cat "$dir/.attesta-complete")" = "$PKGS" ]; then
  echo "$dir"
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "distro-root.sh must run as root (debootstrap)" >&2
  exit 2
fi
mkdir -p "$cache"
# One build at a time (apt and debootstrap included); a second caller waits, then finds the tree
# done.
exec 9>"$cache/.lock"
flock 9
if [ -f "$dir/.attesta-complete" ] && [ "$(cat "$dir/.attesta-complete")" = "$PKGS" ]; then
  echo "$dir"
  exit 0
fi
install_pkg() {
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@" >&2 \
    || { apt-get update -qq >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@" >&2; }
}
command -v debootstrap >/dev/null 2>&1 || install_pkg debootstrap
# The archive's keyring, so that debootstrap verifies the release on the mirror found below
# (without it, debootstrap would fall back to a fixed https host).
keyring=/usr/share/keyrings/debian-archive-keyring.gpg
[ -f "$keyring" ] || install_pkg debian-archive-keyring
mirror=$(bash "$(dirname "$0")/apt-mirror.sh") || {
  echo "distro-root.sh: no Debian bookworm mirror found in /etc/apt" >&2
  exit 1
}
tmp=$(mktemp -d "$cache/.build.XXXXXX")
trap 'rm -rf --one-file-system "$tmp"' EXIT
echo "distro-root.sh: debootstrap bookworm from $mirror (a few minutes, once)" >&2
debootstrap --variant=minbase --keyring="$keyring" --include="$PKGS" bookworm "$tmp/root" "$mirror" >&2
# No downloaded packages kept; nothing of this host in it.
rm -rf "$tmp/root"/var/cache/apt/archives/*.deb
echo "$PKGS" > "$tmp/root/.attesta-complete"
rm -rf --one-file-system "$dir"
mv -T "$tmp/root" "$dir"
echo "$dir"
