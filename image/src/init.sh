#!/bin/busybox sh
# /init of an attesta-image initramfs (PID 1). Measured with the rest of the initramfs: the
# host can change none of it. It loads the modules the boot needs, brings the network up, runs
# attesta-guest (attest, receive the key, format or unlock LUKS2), mounts the decrypted root
# and switches to it. Every failure ends the boot (fail closed): a kernel panic, which pvpanic
# reports to the host (QEMU `-action panic=exit-failure`, libvirt `on_crash`); never a shell.
#
# Kernel command line (measured too):
#   attesta.ip=ADDR/PREFIX  the guest's address on eth0 (default 10.0.2.15/24, QEMU user net)
#   attesta.gw=ADDR         its default route (default 10.0.2.2)
#   attesta.then=poweroff   power off once the root is up (tests); default: run the root's init

/bin/busybox mkdir -p /bin /sbin /usr/bin /usr/sbin
/bin/busybox --install -s
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
export DM_DISABLE_UDEV=1

mkdir -p /proc /sys /dev /run /newroot
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs -o mode=0755,nosuid,nodev tmpfs /run
# No SysRq from the console the host owns (no task or register dumps, no killing); writing
# /proc/sysrq-trigger, as fail() does, works regardless.
echo 0 > /proc/sys/kernel/sysrq

say() {
    echo "attesta-init: $*" > /dev/console
}

fail() {
    say "FAILED (fail closed): $*"
    sync
    # A panic: pvpanic tells the host, and nothing of this boot goes on.
    echo c > /proc/sysrq-trigger
    poweroff -f
    exit 1
}

arg() {
    for a in $(cat /proc/cmdline); do
        case "$a" in
            "$1"=*) echo "${a#*=}"; return ;;
        esac
    done
    echo "$2"
}

say "loading modules"
while read -r m; do
    [ -n "$m" ] || continue
    insmod "/lib/modules/$m" || fail "insmod $m"
done < /etc/attesta/modules

ip="$(arg attesta.ip 10.0.2.15/24)"
gw="$(arg attesta.gw 10.0.2.2)"
ip link set lo up || fail "loopback"
n=0
while [ ! -e /sys/class/net/eth0 ]; do
    n=$((n + 1))
    [ "$n" -le 50 ] || fail "no network interface eth0"
    sleep 0.1
done
ip link set eth0 up && ip addr add "$ip" dev eth0 && ip route add default via "$gw" \
    || fail "network $ip via $gw"
say "network up: $ip via $gw"

# The mapping's name, as attesta-image read it from guest.toml.
name="$(cat /etc/attesta/name)"
[ -n "$name" ] || fail "no disk name"

attesta-guest unlock --config /etc/attesta/guest.toml > /run/attesta-unlock.out
rc=$?
cat /run/attesta-unlock.out > /dev/console
[ "$rc" -eq 0 ] || fail "attesta-guest exit status $rc"

# The root file system is made only on the boot where attesta-guest formatted the volume
# itself (the VM's first release); a volume that does not mount later is an attack or a
# fault, never a reason to make a new file system over it.
if ! mount -t ext4 "/dev/mapper/$name" /newroot 2> /dev/null; then
    grep -q " formatted and unlocked " /run/attesta-unlock.out \
        || fail "/dev/mapper/$name holds no file system, and this is not the first boot"
    say "first boot: making the root file system"
    # 4096-byte blocks: the volume has 4096-byte sectors.
    mke2fs -q -b 4096 "/dev/mapper/$name" || fail "mke2fs"
    mount -t ext4 "/dev/mapper/$name" /newroot || fail "mount the new root"
fi

# The root's own system comes from this (measured) initramfs on every boot and runs from
# tmpfs (/run, moved into the root): nothing it executes is read from the host's disk, whose
# sectors the host could replay.
for d in bin sbin usr/bin usr/sbin proc sys dev run root root/.ssh etc tmp; do
    mkdir -p "/newroot/$d" || fail "root: $d"
done
mkdir -p /run/attesta && cp /bin/busybox /run/attesta/busybox \
    && cp /etc/attesta/root-init /run/attesta/init && chmod 0755 /run/attesta/init \
    || fail "root: its init"
echo "$(arg attesta.then run)" > /run/attesta-then
# The modules are loaded; no more can be.
echo 1 > /proc/sys/kernel/modules_disabled

mount --move /run /newroot/run || fail "move /run"
mount --move /dev /newroot/dev || fail "move /dev"
umount /sys /proc
say "root mounted; switching to it"
exec switch_root /newroot /run/attesta/init
fail "switch_root"
