//! A real VM through the whole system: `attesta-image` builds the image (and its measurement),
//! the operator allows it and registers the VM with the real `attesta-kbs serve`, and Debian's
//! cloud kernel boots it under QEMU (TCG) with the simulated PSP (`attesta-sim psp`, which
//! measures the files QEMU is given) on a virtio-serial port. In the guest, the real
//! `attesta-guest` attests, formats LUKS2 with the released key, dm-crypt maps it, a root file
//! system is made on it and switched to, with the tenant's SSH key on tmpfs; the second boot
//! unlocks the same root; a LUKS2 header the host edited to cipher_null is refused inside the
//! guest; an initrd swapped by the host is denied; a terminated VM's next boot fails closed (a
//! panic through pvpanic, never the root).

mod common;

use common::{free_port, kbs, ok, sign_allowlist, start};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};

fn ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

/// A prerequisite is missing: skip with a message, but fail on CI.
fn missing(what: &str) {
    assert!(!ci(), "{what} (required when CI=true)");
    eprintln!("SKIP: {what}");
}

/// A binary built beside `attesta-kbs` by `cargo test --workspace`.
fn sibling(name: &str) -> PathBuf {
    Path::new(env!("CARGO_BIN_EXE_attesta-kbs")).with_file_name(name)
}

struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

const SEED: &str = "real-vm-test";
const VM: &str = "vm-real";

/// Boots the image in `img` once with the PSP's socket `psp` and the disk `disk`; the console
/// and QEMU's exit status.
fn boot(img: &Path, psp: &Path, disk: &Path) -> (String, Option<i32>) {
    let out: Output = attesta_image::qemu::command(img, disk, Some(psp), 600)
        .unwrap()
        .output()
        .unwrap();
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        out.status.code(),
    )
}

/// Starts the simulated PSP for the VM launched from `img` (measuring those files with `ovmf`
/// as the firmware); returns it with its measurement.
fn psp(img: &Path, ovmf: &Path, socket: &Path, state: &Path) -> (KillOnDrop, String) {
    let mut child = Command::new(sibling("attesta-sim"))
        .arg("psp")
        .arg("--socket")
        .arg(socket)
        .arg("--ovmf")
        .arg(ovmf)
        .arg("--kernel")
        .arg(img.join("vmlinuz"))
        .arg("--initrd")
        .arg(img.join("initrd.img"))
        .arg("--append")
        .arg(std::fs::read_to_string(img.join("cmdline")).unwrap())
        .args(["--vcpus", "1", "--vcpu-type", "EPYC-Milan", "--seed", SEED])
        .arg("--state")
        .arg(state)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    assert!(socket.exists(), "the PSP is not listening");
    (KillOnDrop(child), line.trim().to_string())
}

#[test]
fn a_real_vm_boots_through_the_whole_system() {
    let Some(kernel_dir) = std::env::var_os("ATTESTA_GUEST_KERNEL").map(PathBuf::from) else {
        return missing("ATTESTA_GUEST_KERNEL not set (bash scripts/guest-kernel.sh)");
    };
    for bin in ["attesta-image", "attesta-sim", "attesta-guest"] {
        if !sibling(bin).exists() {
            return missing(&format!("{bin} not built (cargo build --workspace)"));
        }
    }
    if Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .is_err()
    {
        return missing("qemu-system-x86_64 not installed");
    }
    let (vmlinuz, modules) = attesta_image::qemu::unpacked_kernel(&kernel_dir).unwrap();

    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n);
    let d = p("kbs");
    let state = p("sim-state");
    let pki = simulator::Pki::cached(
        snp::Product::Milan,
        &simulator::Seed::from_text(SEED),
        &state,
        |_| {},
    )
    .unwrap();
    let chip_id = hex::encode(simulator::ChipConfig::typical(&pki, 0).chip_id);
    std::fs::write(p("sim-ark.der"), &pki.ark.cert).unwrap();
    let listen = format!("127.0.0.1:{}", free_port());
    ok(
        kbs()
            .args(["init", "--dir"])
            .arg(&d)
            .args(["--listen", &listen, "--trust-root"])
            .arg(p("sim-ark.der"))
            .output()
            .unwrap(),
        "init",
    );
    let port = listen.rsplit(':').next().unwrap();
    let response_key = std::fs::read_to_string(d.join("response.pub")).unwrap();

    // The image: the guest reaches the broker at QEMU's view of the host's loopback.
    let image = |name: &str, timeout: u32| -> (PathBuf, String) {
        std::fs::write(
            p("guest.toml"),
            format!(
                "vm_id = \"{VM}\"\n\
                 [broker]\naddress = \"10.0.2.2:{port}\"\nserver_name = \"kbs.attesta.local\"\n\
                 ca = \"/etc/attesta/kbs-ca.crt\"\nresponse_key = \"{}\"\ntimeout_secs = {timeout}\n\
                 [disk]\npath = \"/dev/vda\"\nname = \"attesta-root\"\n\
                 [device]\nkind = \"virtio-psp\"\n",
                response_key.trim()
            ),
        )
        .unwrap();
        let out = p(name);
        let stdout = ok(
            Command::new(sibling("attesta-image"))
                .arg("build")
                .arg("--kernel")
                .arg(&vmlinuz)
                .arg("--modules")
                .arg(&modules)
                .arg("--guest-config")
                .arg(p("guest.toml"))
                .arg("--broker-ca")
                .arg(d.join("tls-ca.crt"))
                .arg("--agent")
                .arg(sibling("attesta-guest"))
                .args([
                    "--allow-simulator",
                    "--append",
                    "attesta.then=poweroff",
                    "--ovmf",
                ])
                .arg(p("ovmf.fd"))
                .args(["--vcpus", "1", "--vcpu-type", "EPYC-Milan", "--out"])
                .arg(&out)
                .output()
                .unwrap(),
            "attesta-image build",
        );
        (out, stdout.trim().to_string())
    };
    std::fs::write(p("ovmf.fd"), measure::synthetic_ovmf(262_144, 7)).unwrap();
    let (img, measurement) = image("img", 30);

    // The operator allows the image's measurement (as the manifest states it) and registers
    // the VM on this chip, with the tenant's SSH key as its boot configuration.
    sign_allowlist(&d, &measurement);
    let mut toml = std::fs::read_to_string(d.join("kbs.toml")).unwrap();
    toml.push_str("allowlist = \"allowlist.signed\"\n");
    std::fs::write(d.join("kbs.toml"), toml).unwrap();
    std::fs::write(p("ssh.pub"), "ssh-ed25519 AAAAC3Nza tenant@laptop\n").unwrap();
    for (kind, extra) in [
        (
            "register",
            vec!["--measurement", &measurement, "--chip-id", &chip_id],
        ),
        ("terminate", vec![]),
    ] {
        let mut c = kbs();
        c.args(["order", kind, "--key"])
            .arg(d.join("operator.key"))
            .args(["--vm-id", VM, "--tenant", "tenant-a"])
            .args(&extra);
        if kind == "register" {
            c.arg("--boot-config").arg(p("ssh.pub"));
        }
        ok(
            c.arg("--out")
                .arg(p(&format!("{kind}.signed")))
                .output()
                .unwrap(),
            kind,
        );
    }
    ok(
        kbs()
            .args(["cert", "issue", "--ca-key"])
            .arg(d.join("tls-ca.key"))
            .args(["--name", "miner-1", "--role", "host", "--out-dir"])
            .arg(p("certs"))
            .output()
            .unwrap(),
        "cert issue",
    );
    let log = Arc::new(Mutex::new(String::new()));
    let _server = KillOnDrop(start(&d.join("kbs.toml"), log.clone()));
    let remote = |cmd: &str, order: &str| {
        ok(
            kbs()
                .args(["vm", cmd])
                .arg(p(order))
                .args(["--kbs", &listen, "--ca"])
                .arg(d.join("tls-ca.crt"))
                .arg("--cert")
                .arg(p("certs/miner-1.crt"))
                .arg("--key")
                .arg(p("certs/miner-1.key"))
                .output()
                .unwrap(),
            cmd,
        )
    };
    remote("register", "register.signed");

    // The host created the disk blank.
    let disk = p("disk.img");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    let sock = p("psp.sock");
    let (psp_proc, measured) = psp(&img, &p("ovmf.fd"), &sock, &state);
    assert_eq!(
        measured, measurement,
        "the PSP measures what the image states"
    );

    // First boot: attest, format, make the root, switch to it, keys on tmpfs.
    let (console, code) = boot(&img, &sock, &disk);
    for seen in [
        "formatted and unlocked (generation 1, boot 1) as /dev/mapper/attesta-root",
        "attesta-init: first boot: making the root file system",
        "ATTESTA-ROOT-UP boots_on_this_root=1 authorized_keys=1",
        "ATTESTA-KEYS-ON-DISK bytes=0",
    ] {
        assert!(
            console.contains(seen),
            "first boot: {seen:?} missing:\n{console}"
        );
    }
    assert_eq!(code, Some(0), "first boot powers off cleanly:\n{console}");
    let header = std::fs::read(&disk).unwrap();
    assert_eq!(&header[..6], b"LUKS\xba\xbe", "the disk is LUKS2 now");
    assert!(
        !header
            .windows(b"tenant@laptop".len())
            .any(|w| w == b"tenant@laptop"),
        "the SSH key never reaches the disk in clear"
    );

    // Second boot: the same root, unlocked (not formatted again).
    let (console, code) = boot(&img, &sock, &disk);
    assert!(
        console.contains("unlocked (generation 1, boot 2)")
            && !console.contains("formatted and unlocked")
            && console.contains("ATTESTA-ROOT-UP boots_on_this_root=2 authorized_keys=1")
            && console.contains("ATTESTA-KEYS-ON-DISK bytes=0"),
        "second boot:\n{console}"
    );
    assert_eq!(code, Some(0), "{console}");

    // The host edits the LUKS2 header to cipher_null (checksums fixed) on a copy of the disk:
    // the key is released, and the guest refuses the disk before activating anything.
    let tampered = p("tampered.img");
    std::fs::copy(&disk, &tampered).unwrap();
    let meta = std::fs::read(&tampered).unwrap();
    let forged = guest_agent::header::forge_json_edit(&meta, |t| {
        *t = t.replacen("\"aes-xts-plain64\"", "\"cipher_null-ecb\"", 2)
    })
    .unwrap();
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .open(&tampered)
        .unwrap();
    std::io::Write::write_all(&mut f, &forged).unwrap();
    drop(f);
    let (console, code) = boot(&img, &sock, &tampered);
    assert!(
        console.contains(
            "refusing the LUKS2 header: the header names the data cipher \"cipher_null-ecb\""
        ) && console.contains("attesta-init: FAILED (fail closed)")
            && !console.contains("ATTESTA-ROOT-UP"),
        "tampered header:\n{console}"
    );
    assert_eq!(code, Some(1), "{console}");
    drop(psp_proc);

    // The host swaps the initrd (another configuration in it): the PSP measures what is
    // launched, the broker denies it, and the guest stops.
    let (swapped, other) = image("swapped", 31);
    assert_ne!(other, measurement);
    let mut mixed = img.clone();
    mixed.set_file_name("mixed");
    std::fs::create_dir_all(&mixed).unwrap();
    for f in ["vmlinuz", "cmdline"] {
        std::fs::copy(img.join(f), mixed.join(f)).unwrap();
    }
    std::fs::copy(swapped.join("initrd.img"), mixed.join("initrd.img")).unwrap();
    let (_psp2, measured) = psp(&mixed, &p("ovmf.fd"), &sock, &state);
    assert_eq!(measured, other);
    let (console, code) = boot(&mixed, &sock, &disk);
    assert!(
        console.contains("measurement_not_allowed")
            && console.contains("attesta-init: FAILED (fail closed)")
            && !console.contains("ATTESTA-ROOT-UP"),
        "swapped initrd:\n{console}"
    );
    assert_eq!(code, Some(1), "{console}");
    drop(_psp2);

    // Terminated: the key is gone, the next boot fails closed.
    remote("terminate", "terminate.signed");
    let (_psp3, _) = psp(&img, &p("ovmf.fd"), &sock, &state);
    let (console, code) = boot(&img, &sock, &disk);
    assert!(
        console.contains("vm_terminated")
            && console.contains("attesta-init: FAILED (fail closed)")
            && !console.contains("ATTESTA-ROOT-UP"),
        "terminated:\n{console}"
    );
    assert_eq!(code, Some(1), "{console}");
}
