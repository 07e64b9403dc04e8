//! Distro images: attesta's initramfs-tools hook and dracut module, installed as
//! `guest-agent/dist/README.md` says into a Debian 12 system (`scripts/distro-root.sh`, found
//! through `ATTESTA_DISTRO_ROOT`), generate initramfs images for Debian's cloud kernel inside it
//! (chroot, in a mount namespace of its own), and each boots for real under QEMU (TCG, Debian's
//! OVMF) with the real `attesta-kbs serve` on loopback. The simulated PSP is told the launch
//! measurement of exactly the files QEMU boots (computed here, as the host agent would), and
//! the broker allows only those measurements: what is proven is the generators' initramfs, not
//! the measurement.
//!
//! First boot of each: the real `attesta-guest` in the distro's initramfs attests, receives the
//! key, formats LUKS2 and dm-crypt maps it, all before the root is mounted; the root's own init
//! then reports the mapping (a `CRYPT-LUKS2` device-mapper uuid), `/run` on tmpfs and the
//! tenant's SSH key there. The second boot unlocks the same volume. The third finds a root that
//! does not mount after the unlock (as a host corrupting it would leave it): the generators' own
//! failure paths must not open a shell either: initramfs-tools reboots on the hook's `panic=10`
//! default (the command line has no `panic=`), dracut powers off (`rd.shell=0
//! rd.emergency=poweroff` from the module). Then the operator terminates both VMs at the broker,
//! and the next boot of each fails closed in the agent: no shell is left waiting and the root's
//! init never runs; initramfs-tools reboots, dracut powers off (the unit's `FailureAction=`).
//! QEMU runs with `-no-reboot`, so either ends it.

mod common;

use common::{KillOnDrop, free_port, kbs, missing, ok, sibling, sign_allowlist_at, start};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};

const OVMF: &str = "/usr/share/ovmf/OVMF.fd";
const SEED: &str = "distro-initramfs-test";
/// The root's init prints this, then powers off.
const MARKER: &str = "ATTESTA-DISTRO-ROOT-UP";
/// The root is a plain ext4 image on the second disk; the first is the encrypted one.
const IP: &str = "ip=10.0.2.15::10.0.2.2:255.255.255.0::eth0:off net.ifnames=0";

fn run(c: &mut Command, what: &str) -> String {
    ok(c.output().unwrap(), what)
}

/// A copy of the distro tree in a folder of its own (under the target folder: /tmp may be
/// noexec).
struct Chroot {
    root: PathBuf,
    _dir: tempfile::TempDir,
}

impl Chroot {
    fn copy(from: &Path) -> Chroot {
        let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
        let root = dir.path().join("root");
        run(
            Command::new("cp")
                .args(["-a", "--reflink=auto"])
                .arg(from)
                .arg(&root),
            "copy the distro tree",
        );
        Chroot { root, _dir: dir }
    }

    /// Runs `args` chrooted into the tree, in a private mount namespace whose /proc, /sys and
    /// /dev (the generators need them) vanish with the command: nothing stays mounted under the
    /// folder for its removal to descend into, however the test ends.
    fn run(&self, args: &[&str], what: &str) -> String {
        const SETUP: &str = "set -e; r=$1; shift; mount -t proc proc \"$r/proc\"; \
            mount -t sysfs sysfs \"$r/sys\"; mount -t devtmpfs devtmpfs \"$r/dev\"; \
            exec chroot \"$r\" \"$@\"";
        run(
            Command::new("unshare")
                .args([
                    "--mount",
                    "--propagation",
                    "private",
                    "sh",
                    "-c",
                    SETUP,
                    "sh",
                ])
                .arg(&self.root)
                .args(args),
            what,
        )
    }

    /// Installs `from` at `to` inside the tree with `mode`.
    fn install(&self, from: &Path, to: &str, mode: &str) {
        run(
            Command::new("install")
                .args(["-D", "-m", mode])
                .arg(from)
                .arg(self.root.join(to.trim_start_matches('/'))),
            "install",
        );
    }
}

/// One distro generator's VM: its initrd, command line, disk and measurement.
struct Vm {
    generator: &'static str,
    vm_id: String,
    initrd: PathBuf,
    cmdline: String,
    disk: PathBuf,
    measurement: [u8; 48],
}

/// The root file system's image: busybox and an init that reports what the initramfs left.
fn root_image(dir: &Path) -> PathBuf {
    let tree = dir.join("root-tree");
    for d in ["bin", "sbin", "proc", "sys", "dev", "run", "tmp", "etc"] {
        std::fs::create_dir_all(tree.join(d)).unwrap();
    }
    // systemd switches only into an OS tree: one with os-release.
    std::fs::write(tree.join("etc/os-release"), "ID=attesta-test\n").unwrap();
    std::fs::copy("/bin/busybox", tree.join("bin/busybox")).unwrap();
    std::fs::write(
        tree.join("sbin/init"),
        format!(
            "#!/bin/busybox sh\n\
             /bin/busybox mount -t proc proc /proc\n\
             /bin/busybox mount -t sysfs sysfs /sys\n\
             dm=none\n\
             for d in /sys/block/dm-*; do\n\
             \x20   [ -e \"$d/dm/name\" ] && dm=\"$(/bin/busybox cat \"$d/dm/name\"):$(/bin/busybox cat \"$d/dm/uuid\")\"\n\
             done\n\
             key=0\n\
             /bin/busybox grep -q tenant@laptop /run/attesta/boot-config 2>/dev/null && key=1\n\
             run=$(/bin/busybox awk '$2 == \"/run\" {{ print $3 }}' /proc/mounts)\n\
             echo \"{MARKER} dm=$dm run_fs=$run boot_config_key=$key\" > /dev/console\n\
             /bin/busybox poweroff -f\n"
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(
        tree.join("sbin/init"),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    let img = dir.join("root.ext4");
    run(
        Command::new("mke2fs")
            .args(["-q", "-t", "ext4", "-d"])
            .arg(&tree)
            .arg(&img)
            .arg("16M"),
        "mke2fs",
    );
    img
}

/// `s` without terminal escapes (systemd colours its status lines) and carriage returns.
fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        match c {
            '\u{1b}' => {
                // CSI: ESC [ parameters, then a final byte in @..~.
                if chars.next() == Some('[') {
                    for f in chars.by_ref() {
                        if ('@'..='~').contains(&f) {
                            break;
                        }
                    }
                }
            }
            '\r' => {}
            c => out.push(c),
        }
    }
    out
}

/// The line of `console` holding `what`.
fn line_with<'a>(console: &'a str, what: &str) -> Option<&'a str> {
    console.lines().find(|l| l.contains(what))
}

/// Boots `vm` once with its simulated PSP; the console.
fn boot(vm: &Vm, vmlinuz: &Path, root: &Path, pki: &Arc<simulator::Pki>, dir: &Path) -> String {
    let sock = dir.join(format!("{}.psp", vm.generator));
    let chip = simulator::Chip::new(pki.clone(), simulator::ChipConfig::typical(pki, 0)).unwrap();
    let launch = simulator::GuestLaunch {
        measurement: vm.measurement,
        ..Default::default()
    };
    let _psp = simulator::psp::Server::start(chip, launch, &sock).unwrap();
    let console = dir.join(format!("{}.console", vm.generator));
    let mut c = attesta_image::qemu::command_for(
        vmlinuz,
        &vm.initrd,
        &vm.cmdline,
        &vm.disk,
        Some(&sock),
        420,
    );
    let status = c
        .args(["-bios", OVMF, "-drive"])
        .arg(format!(
            "file={},if=virtio,format=raw,readonly=on",
            root.display()
        ))
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&console).unwrap())
        .stderr(Stdio::null())
        .status()
        .unwrap();
    let text = strip_ansi(&String::from_utf8_lossy(&std::fs::read(&console).unwrap()));
    // 124: `timeout` ended it. A guest left waiting (a shell, a hung boot) must not pass.
    assert_ne!(
        status.code(),
        Some(124),
        "{}: the guest neither finished nor powered off:\n{text}",
        vm.generator
    );
    text
}

#[test]
fn distro_initramfs_generators_with_attestas_hooks_boot_unlock_and_fail_closed() {
    let Some(kernel_dir) = std::env::var_os("ATTESTA_GUEST_KERNEL").map(PathBuf::from) else {
        return missing("ATTESTA_GUEST_KERNEL not set (bash scripts/guest-kernel.sh)");
    };
    let Some(distro) = std::env::var_os("ATTESTA_DISTRO_ROOT").map(PathBuf::from) else {
        return missing("ATTESTA_DISTRO_ROOT not set (bash scripts/distro-root.sh)");
    };
    if !sibling("attesta-guest").exists() {
        return missing("attesta-guest not built (cargo build --workspace)");
    }
    if !Path::new(OVMF).exists() {
        return missing("no Debian OVMF (apt-get install ovmf)");
    }
    let uid = run(Command::new("id").arg("-u"), "id");
    if uid.trim() != "0" {
        return missing("chroot and mount namespaces need root");
    }
    let (vmlinuz, modules) = attesta_image::qemu::unpacked_kernel(&kernel_dir).unwrap();
    let kver = modules.file_name().unwrap().to_str().unwrap().to_string();

    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let p = |n: &str| dir.path().join(n);
    let d = p("kbs");
    let pki = Arc::new(
        simulator::Pki::cached(
            snp::Product::Milan,
            &simulator::Seed::from_text(SEED),
            &p("sim-state"),
            |_| {},
        )
        .unwrap(),
    );
    let chip_id = hex::encode(simulator::ChipConfig::typical(&pki, 0).chip_id);
    std::fs::write(p("sim-ark.der"), &pki.ark.cert).unwrap();
    let listen = format!("127.0.0.1:{}", free_port());
    run(
        kbs()
            .args(["init", "--dir"])
            .arg(&d)
            .args(["--listen", &listen, "--trust-root"])
            .arg(p("sim-ark.der")),
        "init",
    );
    let port = listen.rsplit(':').next().unwrap().to_string();
    let response_key = std::fs::read_to_string(d.join("response.pub")).unwrap();

    // The distro system: the kernel's modules, the agent, and the hooks installed as the
    // packaging README says. The agent is this workspace's build, whose simulator feature
    // speaks to the simulated PSP (`[device] kind = "virtio-psp"`).
    let chroot = Chroot::copy(&distro);
    std::fs::create_dir_all(chroot.root.join("usr/lib/modules")).unwrap();
    run(
        Command::new("cp")
            .arg("-a")
            .arg(&modules)
            .arg(chroot.root.join("usr/lib/modules")),
        "copy the kernel's modules",
    );
    for f in std::fs::read_dir(kernel_dir.join("boot"))
        .unwrap()
        .flatten()
    {
        std::fs::copy(f.path(), chroot.root.join("boot").join(f.file_name())).unwrap();
    }
    chroot.run(&["depmod", &kver], "depmod");
    chroot.install(&sibling("attesta-guest"), "/usr/bin/attesta-guest", "0755");
    chroot.install(&d.join("tls-ca.crt"), "/etc/attesta/kbs-ca.crt", "0644");
    let dist = Path::new(env!("CARGO_MANIFEST_DIR")).join("../guest-agent/dist");
    chroot.install(
        &dist.join("initramfs-tools/hooks/attesta"),
        "/etc/initramfs-tools/hooks/attesta",
        "0755",
    );
    chroot.install(
        &dist.join("initramfs-tools/scripts/local-top/attesta"),
        "/etc/initramfs-tools/scripts/local-top/attesta",
        "0755",
    );
    chroot.install(
        &dist.join("dracut/90attesta/module-setup.sh"),
        "/usr/lib/dracut/modules.d/90attesta/module-setup.sh",
        "0755",
    );
    chroot.install(
        &dist.join("systemd/attesta-unlock.service"),
        "/usr/lib/dracut/modules.d/90attesta/attesta-unlock.service",
        "0644",
    );

    // One VM per generator, each with its own guest.toml (and so its own initrd).
    let vm_for = |generator: &'static str| -> Vm {
        let vm_id = format!("vm-{generator}-{}", std::process::id());
        std::fs::write(
            p("guest.toml"),
            format!(
                "vm_id = \"{vm_id}\"\n\
                 [broker]\naddress = \"10.0.2.2:{port}\"\nserver_name = \"kbs.attesta.local\"\n\
                 ca = \"/etc/attesta/kbs-ca.crt\"\nresponse_key = \"{}\"\ntimeout_secs = 60\n\
                 [disk]\npath = \"/dev/vda\"\nname = \"attesta-root\"\n\
                 [device]\nkind = \"virtio-psp\"\n",
                response_key.trim()
            ),
        )
        .unwrap();
        chroot.install(&p("guest.toml"), "/etc/attesta/guest.toml", "0644");
        let out = format!("/boot/initrd-{generator}.img");
        // No panic=: the hook's default must keep a shell from opening.
        let cmdline = format!("console=ttyS0 root=/dev/vdb ro {IP}");
        match generator {
            "initramfs-tools" => {
                // No kernel is installed in the tree, so no update-initramfs: the same
                // generator, called directly.
                chroot.run(&["mkinitramfs", "-o", &out, &kver], "mkinitramfs");
            }
            _ => {
                chroot.run(
                    &[
                        "dracut",
                        "--force",
                        "--no-hostonly",
                        "--kver",
                        &kver,
                        "--add",
                        "attesta",
                        &out,
                    ],
                    "dracut",
                );
            }
        }
        let initrd = chroot.root.join(out.trim_start_matches('/'));
        let measurement = measure::digest_of_files_with(
            &measure::LaunchFiles {
                ovmf: Path::new(OVMF),
                kernel: Some(&vmlinuz),
                initrd: Some(&initrd),
                append: Some(&cmdline),
                vcpus: 1,
                vcpu_type: "EPYC-Milan",
                guest_features: 0x1,
            },
            measure::Firmware::AssumeHashesTable,
        )
        .unwrap();
        let disk = p(&format!("{generator}.disk"));
        std::fs::File::create(&disk)
            .unwrap()
            .set_len(256 << 20)
            .unwrap();
        Vm {
            generator,
            vm_id,
            initrd,
            cmdline,
            disk,
            measurement,
        }
    };
    let vms = [vm_for("initramfs-tools"), vm_for("dracut")];
    // What each generator put in: the agent, its configuration and the CA it pins.
    for vm in &vms {
        let lister = match vm.generator {
            "initramfs-tools" => "lsinitramfs",
            _ => "lsinitrd",
        };
        let inside = format!("/boot/initrd-{}.img", vm.generator);
        let listed = chroot.run(&[lister, &inside], lister);
        // And each generator's guard against a shell after the unlock.
        let guard = match vm.generator {
            "initramfs-tools" => "conf/conf.d/zz-attesta",
            _ => "etc/cmdline.d/90attesta.conf",
        };
        for f in [
            "usr/bin/attesta-guest",
            "etc/attesta/guest.toml",
            "etc/attesta/kbs-ca.crt",
            "virtio_console.ko",
            "dm-crypt.ko",
            guard,
        ] {
            assert!(
                listed.contains(f),
                "{}: {f} not in the initramfs",
                vm.generator
            );
        }
    }

    // The operator allows exactly these two measurements and signs each VM's orders.
    let hexes: Vec<String> = vms.iter().map(|v| hex::encode(v.measurement)).collect();
    let hex_refs: Vec<&str> = hexes.iter().map(String::as_str).collect();
    sign_allowlist_at(&d, 1, &hex_refs, &d.join("allowlist.signed"));
    let mut toml = std::fs::read_to_string(d.join("kbs.toml")).unwrap();
    toml.push_str("allowlist = \"allowlist.signed\"\n");
    std::fs::write(d.join("kbs.toml"), toml).unwrap();
    std::fs::write(p("ssh.pub"), "ssh-ed25519 AAAAC3Nza tenant@laptop\n").unwrap();
    for (vm, m) in vms.iter().zip(&hexes) {
        for kind in ["register", "terminate"] {
            let mut c = kbs();
            c.args(["order", kind, "--key"])
                .arg(d.join("operator.key"))
                .args(["--vm-id", &vm.vm_id, "--tenant", "tenant-a"]);
            if kind == "register" {
                c.args(["--measurement", m, "--chip-id", &chip_id])
                    .arg("--boot-config")
                    .arg(p("ssh.pub"));
            }
            run(c.arg("--out").arg(p(&format!("{}.{kind}", vm.vm_id))), kind);
        }
    }
    run(
        kbs()
            .args(["cert", "issue", "--ca-key"])
            .arg(d.join("tls-ca.key"))
            .args(["--name", "miner-1", "--role", "host", "--out-dir"])
            .arg(p("certs")),
        "cert issue",
    );
    let log = Arc::new(Mutex::new(String::new()));
    let _server = KillOnDrop(start(&d.join("kbs.toml"), log.clone()));
    let host = |cmd: &str, order: &Path| {
        run(
            kbs()
                .args(["vm", cmd])
                .arg(order)
                .args(["--kbs", &listen, "--ca"])
                .arg(d.join("tls-ca.crt"))
                .arg("--cert")
                .arg(p("certs/miner-1.crt"))
                .arg("--key")
                .arg(p("certs/miner-1.key")),
            &format!("vm {cmd}"),
        )
    };
    for vm in &vms {
        host("register", &p(&format!("{}.register", vm.vm_id)));
    }

    // The two generators' VMs boot side by side (one vCPU each).
    let good_root = root_image(dir.path());
    // A root that does not mount, as a host that corrupted it would leave it: a swap signature
    // (a type blkid knows, so initramfs-tools does not wait 30 s for a file system first).
    let blank_root = p("unmountable.img");
    std::fs::File::create(&blank_root)
        .unwrap()
        .set_len(16 << 20)
        .unwrap();
    run(Command::new("mkswap").arg(&blank_root), "mkswap");
    let boot_all = |root: &Path| -> Vec<String> {
        let (vmlinuz, pki, at) = (&vmlinuz, &pki, dir.path());
        std::thread::scope(|s| {
            let runs: Vec<_> = vms
                .iter()
                .map(|vm| s.spawn(move || boot(vm, vmlinuz, root, pki, at)))
                .collect();
            runs.into_iter().map(|r| r.join().unwrap()).collect()
        })
    };

    // First boot: formatted and mapped by dm-crypt before the root was mounted; the root's init
    // runs with the key on tmpfs. Second boot: the same volume unlocked.
    for (boot_no, seen) in [
        (
            1,
            "formatted and unlocked (generation 1, boot 1) as /dev/mapper/attesta-root",
        ),
        (
            2,
            "unlocked (generation 1, boot 2) as /dev/mapper/attesta-root",
        ),
    ] {
        for (vm, c) in vms.iter().zip(boot_all(&good_root)) {
            let g = vm.generator;
            let broker = log.lock().unwrap().clone();
            assert!(
                boot_no == 1 || !c.contains("formatted and unlocked"),
                "{g}, boot {boot_no}: the volume was formatted again:\n{c}"
            );
            let unlocked = c.find(seen).unwrap_or_else(|| {
                panic!("{g}, boot {boot_no}: the agent did not unlock:\n{c}\nbroker:\n{broker}")
            });
            // dracut's agent line reaches the console through the journal, later than the
            // kernel's: there systemd's own line says when the unit finished.
            let finished = match g {
                "initramfs-tools" => unlocked,
                _ => c.find("Finished attesta-unlock").unwrap_or_else(|| {
                    panic!("{g}, boot {boot_no}: attesta-unlock did not finish:\n{c}")
                }),
            };
            let mounted = c
                .find("EXT4-fs (vdb): mounted")
                .unwrap_or_else(|| panic!("{g}, boot {boot_no}: the root was not mounted:\n{c}"));
            assert!(
                finished < mounted,
                "{g}, boot {boot_no}: the root was mounted before the volume was unlocked:\n{c}"
            );
            let up = line_with(&c, MARKER).unwrap_or_else(|| {
                panic!("{g}, boot {boot_no}: the root's init did not run:\n{c}")
            });
            assert!(
                up.contains(" dm=attesta-root:CRYPT-LUKS2-")
                    && up.contains(" run_fs=tmpfs ")
                    && up.trim_end().ends_with(" boot_config_key=1"),
                "{g}, boot {boot_no}: not a LUKS2 mapping with the key on tmpfs: {up}"
            );
        }
    }

    // Unlocked, but the root does not mount: no shell, whatever failed after the agent. The
    // agent itself succeeded here, so this is the generators' own failure path: the hook's
    // panic= default (initramfs-tools), rd.shell=0 with rd.emergency=poweroff (dracut).
    for (vm, c) in vms.iter().zip(boot_all(&blank_root)) {
        let g = vm.generator;
        assert!(
            c.contains("unlocked (generation 1, boot 3) as /dev/mapper/attesta-root"),
            "{g}: the agent did not unlock:\n{c}"
        );
        assert!(!c.contains(MARKER), "{g}: a root's init ran:\n{c}");
        let down: &[&str] = match g {
            "initramfs-tools" => &[
                "Rebooting automatically due to panic= boot argument",
                "reboot: Restarting system",
            ],
            _ => &["reboot: Power down"],
        };
        for d in down {
            assert!(c.contains(d), "{g}: no {d:?}:\n{c}");
        }
    }

    // Terminated at the broker: the next boot of each fails closed.
    for vm in &vms {
        host("terminate", &p(&format!("{}.terminate", vm.vm_id)));
    }
    for (vm, c) in vms.iter().zip(boot_all(&good_root)) {
        let g = vm.generator;
        assert!(c.contains("vm_terminated"), "{g}: no denial seen:\n{c}");
        assert!(
            c.contains("attesta-guest unlock: FAILED (fail closed)"),
            "{g}: the agent did not fail closed:\n{c}"
        );
        assert!(!c.contains(MARKER), "{g}: the root's init ran:\n{c}");
        // Stopped by the hook's own failure path, and the guest went down.
        let (stopped, down) = match g {
            "initramfs-tools" => (
                "attesta: unlocking the disk failed (exit 1",
                "reboot: Restarting system",
            ),
            _ => ("Failed to start attesta-un", "reboot: Power down"),
        };
        assert!(c.contains(stopped), "{g}: not stopped by the hook:\n{c}");
        assert!(c.contains(down), "{g}: did not go down ({down}):\n{c}");
    }
}
