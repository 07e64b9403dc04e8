#!/run/attesta/busybox sh
# PID 1 on the decrypted root of an attesta-image VM: copied from the measured initramfs to
# tmpfs (/run/attesta) on every boot and run from there, with the busybox beside it. The boot
# configuration released with the key stays on tmpfs too: the tenant's SSH keys are
# bind-mounted onto /root/.ssh/authorized_keys, never written to the disk.
/run/attesta/busybox --install -s
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys

keys=/root/.ssh/authorized_keys
[ -e "$keys" ] || : > "$keys"
# What the disk itself holds there (nothing, ever: the keys are only mounted over it).
echo "ATTESTA-KEYS-ON-DISK bytes=$(wc -c < "$keys")" > /dev/console
if [ -f /run/attesta/boot-config ]; then
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
