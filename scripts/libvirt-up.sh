#!/usr/bin/env bash
# Starts libvirt's QEMU driver daemons (virtlogd, libvirtd) where they are not running and no
# service manager starts them (systemd is not PID 1 in containers); exits non-zero, saying
# why, if qemu:///system still cannot be reached. Idempotent.
set -euo pipefail
# What udev does on a Debian host, where no udev runs: /dev/kvm root:kvm 0660, so that libvirt's
# QEMU user (group kvm) may open it. Without it libvirt finds KVM "enabled when probing, but not
# available now" and probes QEMU's capabilities again on every lookup (~4 s each, ~90 s to define
# one domain), even for TCG domains.
# Only adds the group's access (a /dev/kvm already open to others stays so); a /dev that cannot
# be changed is worked around by libvirt, slowly: a warning, not a failure.
if [ -c /dev/kvm ] && getent group kvm >/dev/null && [ "$(stat -c %G /dev/kvm)" != kvm ]; then
  { chgrp kvm /dev/kvm && chmod g+rw /dev/kvm; } \
    || echo "libvirt-up: warning: cannot give /dev/kvm to group kvm; libvirt will re-probe QEMU on every call" >&2
fi
# libvirtd answers without virtlogd, but QEMU domains need it to start: check both.
if pgrep -x virtlogd >/dev/null && virsh -c qemu:///system version >/dev/null 2>&1; then
  exit 0
fi
command -v libvirtd >/dev/null || { echo "libvirt-up: libvirtd not installed (bash scripts/setup.sh)" >&2; exit 1; }
pgrep -x virtlogd >/dev/null || virtlogd -d
pgrep -x libvirtd >/dev/null || libvirtd -d
for _ in $(seq 1 50); do
  virsh -c qemu:///system version >/dev/null 2>&1 && exit 0
  sleep 0.2
done
echo "libvirt-up: qemu:///system is not reachable after starting libvirtd" >&2
exit 1
