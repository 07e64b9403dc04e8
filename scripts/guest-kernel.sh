#!/usr/bin/env bash
# Fetches Debian's cloud kernel (the package linux-image-cloud-amd64 depends on) from this
# machine's apt sources and unpacks it (not installed) under a cache folder; prints that folder,
# which holds boot/vmlinuz-VERSION and lib/modules/VERSION. Real-VM tests and the main job
# boot it under QEMU. Idempotent: an unpacked kernel is reused.
#   bash scripts/guest-kernel.sh [CACHE_DIR]   # default /var/cache/attesta/guest-kernel
set -euo pipefail
cache=${1:-/var/cache/attesta/guest-kernel}
which_pkg() {
  apt-cache depends linux-image-cloud-amd64 2>/dev/null | awk '/Depends: linux-image-/ { print $2; exit }'
}
pkg=$(which_pkg)
if [ -z "$pkg" ]; then
  apt-get update -qq >&2 || true
  pkg=$(which_pkg)
fi
if [ -z "$pkg" ]; then
  echo "guest-kernel.sh: apt knows no linux-image-cloud-amd64 (check the apt sources)" >&2
  exit 1
fi
dir="$cache/$pkg"
if [ ! -d "$dir/lib/modules" ] || ! ls "$dir"/boot/vmlinuz-* >/dev/null 2>&1; then
  mkdir -p "$cache"
  tmp=$(mktemp -d "$cache/.fetch.XXXXXX")
  trap 'rm -rf "$tmp"' EXIT
  chmod 0755 "$tmp"
  # Stale package lists after a point release name a package the mirror no longer has:
  # refresh them once and ask again.
  if ! (cd "$tmp" && apt-get download -q "$pkg" >&2); then
    apt-get update -qq >&2
    pkg=$(which_pkg)
    dir="$cache/$pkg"
    (cd "$tmp" && apt-get download -q "$pkg" >&2)
  fi
  dpkg-deb -x "$tmp"/"$pkg"_*.deb "$tmp/root"
  rm -rf "$dir"
  mv "$tmp/root" "$dir"
fi
echo "$dir"
