#!/bin/sh
# dracut module "attesta": puts attesta-guest, its configuration, the broker CA and the
# attesta-unlock.service unit into a systemd-based initramfs. Everything installed here is part
# of the initramfs, which the launch measurement covers (kernel hashes): that is what stops the
# host from changing which broker or which key the guest trusts.
#
# Install: copy this directory to /usr/lib/dracut/modules.d/90attesta together with
# attesta-unlock.service (from ../../systemd/), then `dracut -f --add attesta`.
# Sourced by dracut (bash), but kept to POSIX sh.

ATTESTA_BIN=/usr/bin/attesta-guest
ATTESTA_CONF=/etc/attesta/guest.toml

# Prints the string value of KEY in [SECTION] of a TOML file. Handles the simple
# `key = "value"` lines guest.toml uses; that is all this module needs from it.
attesta_toml_get() {
    awk -v sec="[$1]" -v key="$2" '
        { sub(/#.*/, "") }
        /^[ \t]*\[/ { s = $0; gsub(/[ \t]/, "", s); insec = (s == sec); next }
        insec && $0 ~ "^[ \t]*" key "[ \t]*=" {
            sub(/^[^=]*=[ \t]*"/, ""); sub(/".*$/, ""); print; exit
        }' "$3"
}

check() {
    require_binaries "$ATTESTA_BIN" || return 1
    # Only when asked for (--add attesta, or add_dracutmodules+=" attesta ").
    return 255
}

depends() {
    # systemd: the unit; network: the broker is reached from the initramfs; crypt: dm_crypt,
    # the kernel crypto modules for aes-xts and (through dm) the device-mapper udev rules that
    # libdevmapper synchronises with. Its crypttab handling is not used.
    echo systemd network crypt
    return 0
}

installkernel() {
    # hostonly='': the image is usually built on a host that is not an SNP guest, where
    # sev-guest is not loaded and host-only mode would leave it out.
    hostonly='' instmods sev-guest dm_crypt xts aesni_intel
    if attesta_virtio_psp; then
        hostonly='' instmods virtio_console
    fi
}

# True when guest.toml asks for the simulated PSP (`[device] kind = "virtio-psp"`, test and
# simulation builds of attesta-guest only), a virtio-serial port.
attesta_virtio_psp() {
    [ -f "$ATTESTA_CONF" ] && [ "$(attesta_toml_get device kind "$ATTESTA_CONF")" = "virtio-psp" ]
}

install() {
    if [ ! -f "$ATTESTA_CONF" ]; then
        dfatal "attesta: $ATTESTA_CONF is missing; the guest cannot boot without it"
        return 1
    fi

    # The CA path comes from guest.toml (conventionally /etc/attesta/kbs-ca.crt); relative
    # paths are relative to the configuration file, as the agent reads them.
    _attesta_ca=$(attesta_toml_get broker ca "$ATTESTA_CONF")
    case $_attesta_ca in
        "") dfatal "attesta: no [broker] ca in $ATTESTA_CONF"; return 1 ;;
        /*) ;;
        *) _attesta_ca="${ATTESTA_CONF%/*}/$_attesta_ca" ;;
    esac
    if [ ! -f "$_attesta_ca" ]; then
        dfatal "attesta: broker CA $_attesta_ca is missing"
        return 1
    fi

    # inst_binary also pulls in the shared libraries, libcryptsetup.so.12 among them.
    inst_binary "$ATTESTA_BIN" /usr/bin/attesta-guest
    inst_simple "$ATTESTA_CONF" /etc/attesta/guest.toml
    inst_simple "$_attesta_ca" "$_attesta_ca"

    # The unit: next to this file when installed, or in the source tree.
    _attesta_unit=
    for _f in "$moddir/attesta-unlock.service" "$moddir/../../systemd/attesta-unlock.service"; do
        if [ -f "$_f" ]; then
            _attesta_unit=$_f
            break
        fi
    done
    if [ -z "$_attesta_unit" ]; then
        dfatal "attesta: attesta-unlock.service not found next to $moddir/module-setup.sh"
        return 1
    fi
    inst_simple "$_attesta_unit" "$systemdsystemunitdir/attesta-unlock.service"

    # Wait for the disk's .device unit (block devices have one; /dev/sev-guest does not).
    # Wants=, not Requires=: if the disk never shows up the agent still runs and fails, which
    # triggers OnFailure= (a dependency failure would not).
    _attesta_disk=$(attesta_toml_get disk path "$ATTESTA_CONF")
    case $_attesta_disk in
        /dev/*)
            if command -v systemd-escape >/dev/null 2>&1; then
                _attesta_dev=$(systemd-escape --path --suffix=device "$_attesta_disk")
                mkdir -p "$initdir$systemdsystemunitdir/attesta-unlock.service.d"
                printf '[Unit]\nWants=%s\nAfter=%s\n' "$_attesta_dev" "$_attesta_dev" \
                    > "$initdir$systemdsystemunitdir/attesta-unlock.service.d/disk.conf"
            else
                dwarn "attesta: systemd-escape not found; not ordering after $_attesta_disk"
            fi
            ;;
    esac

    # Load the modules early so /dev/sev-guest exists when the unit starts (it is ordered
    # after systemd-modules-load.service).
    mkdir -p "$initdir/etc/modules-load.d"
    printf 'sev-guest\ndm_crypt\n' > "$initdir/etc/modules-load.d/attesta.conf"
    if attesta_virtio_psp; then
        echo virtio_console >> "$initdir/etc/modules-load.d/attesta.conf"
    fi

    # rd.neednet=1: bring the network up in the initramfs even though root is local.
    # rd.shell=0 rd.emergency=poweroff: a failure must not open a shell; a shell inside the
    # attested guest could ask /dev/sev-guest for reports and talk to the broker itself.
    mkdir -p "$initdir/etc/cmdline.d"
    echo "rd.neednet=1 rd.shell=0 rd.emergency=poweroff" > "$initdir/etc/cmdline.d/90attesta.conf"

    $SYSTEMCTL -q --root "$initdir" enable attesta-unlock.service
}
