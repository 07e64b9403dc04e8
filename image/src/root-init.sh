#!/bin/busybox sh
# /sbin/init on the decrypted root of an attesta-image VM, refreshed from the measured
# initramfs on every boot. The boot configuration released with the key stays on tmpfs
# (/run/attesta): the tenant's SSH keys are bind-mounted onto /root/.ssh/authorized_keys,
# never written to the disk.
/bin/busybox mkdir -p /usr/bin /usr/sbin
/bin/busybox --install -s
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys

keys=/root/.ssh/authorized_keys
if [ -f /run/attesta/boot-config ]; then
    [ -e "$keys" ] || : > "$keys"
    chmod 0700 /root/.ssh
    mount --bind /run/attesta/boot-config "$keys"
fi
n="$(grep -c . "$keys" 2> /dev/null || echo 0)"
boots="$(cat /var/lib/attesta-boots 2> /dev/null || echo 0)"
boots=$((boots + 1))
mkdir -p /var/lib && echo "$boots" > /var/lib/attesta-boots && sync
echo "ATTESTA-ROOT-UP boots_on_this_root=$boots authorized_keys=$n" > /dev/console

if [ "$(cat /run/attesta-then 2> /dev/null)" = poweroff ]; then
    sync
    umount "$keys" 2> /dev/null
    mount -o remount,ro / 2> /dev/null
    poweroff -f
fi
# No service manager in this minimal root: keep PID 1 alive.
while :; do sleep 3600; done
