//! The real `attesta-image` binary: identical inputs give byte-identical images wherever they
//! lie and whatever their file times; the manifest's hashes and measurement agree with the
//! files (and with `sev-snp-measure`); busybox's own cpio reads the initramfs; a broken input is
//! refused with its name; and an image of Debian's cloud kernel boots under QEMU, runs the real
//! attesta-guest in its initramfs and fails closed (a panic reported through pvpanic) on a
//! machine without /dev/sev-guest.

use std::path::{Path, PathBuf};
use std::process::Command;

fn ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

/// `what` is missing: skip the test with a message, but fail it on CI.
fn missing(what: &str) {
    assert!(!ci(), "{what} (required when CI=true)");
    eprintln!("SKIP: {what}");
}

fn image() -> Command {
    Command::new(env!("CARGO_BIN_EXE_attesta-image"))
}

/// A bzImage-shaped file carrying `version`.
fn fake_kernel(version: &str) -> Vec<u8> {
    let mut k = vec![0x90u8; 0x4000];
    k[0x202..0x206].copy_from_slice(b"HdrS");
    k[0x20e..0x210].copy_from_slice(&0x100u16.to_le_bytes());
    let v = format!("{version} (test) #1 SMP\0");
    k[0x300..0x300 + v.len()].copy_from_slice(v.as_bytes());
    k
}

/// A minimal ELF64 module whose `.modinfo` says `depends=DEPS`.
fn fake_module(deps: &str) -> Vec<u8> {
    let info = format!("license=GPL\0depends={deps}\0");
    let names = b"\0.shstrtab\0.modinfo\0";
    let mut elf = vec![0u8; 0x40];
    elf[..4].copy_from_slice(b"\x7fELF");
    elf[4] = 2;
    elf[5] = 1;
    let names_off = elf.len();
    elf.extend_from_slice(names);
    let info_off = elf.len();
    elf.extend_from_slice(info.as_bytes());
    let shoff = elf.len();
    for (name, off, size) in [
        (0u32, 0usize, 0usize),
        (1, names_off, names.len()),
        (11, info_off, info.len()),
    ] {
        let mut s = vec![0u8; 0x40];
        s[..4].copy_from_slice(&name.to_le_bytes());
        s[0x18..0x20].copy_from_slice(&(off as u64).to_le_bytes());
        s[0x20..0x28].copy_from_slice(&(size as u64).to_le_bytes());
        elf.extend_from_slice(&s);
    }
    elf[0x28..0x30].copy_from_slice(&(shoff as u64).to_le_bytes());
    elf[0x3a..0x3c].copy_from_slice(&0x40u16.to_le_bytes());
    elf[0x3c..0x3e].copy_from_slice(&3u16.to_le_bytes());
    elf[0x3e..0x40].copy_from_slice(&1u16.to_le_bytes());
    elf
}

const VERSION: &str = "6.1.0-99-test-amd64";

fn guest_toml(vm: &str) -> String {
    format!(
        "vm_id = \"{vm}\"\nrequire_mlock = true\n\
         [broker]\naddress = \"10.0.2.2:7443\"\nserver_name = \"kbs.attesta.local\"\n\
         ca = \"/etc/attesta/kbs-ca.crt\"\nresponse_key = \"{}\"\ntimeout_secs = 5\n\
         [disk]\npath = \"/dev/vda\"\n",
        "ab".repeat(32)
    )
}

/// Synthetic inputs under `dir`: kernel, a module tree with every module the image needs
/// (one with a dependency, one built in), guest.toml, a CA, an agent stand-in, an OVMF.
fn inputs(dir: &Path) -> PathBuf {
    let m = dir.join("lib/modules").join(VERSION);
    std::fs::create_dir_all(m.join("kernel/drivers/md")).unwrap();
    std::fs::create_dir_all(m.join("kernel/other")).unwrap();
    for name in attesta_image::modules::NEEDED {
        let (path, deps) = match *name {
            "dm_crypt" => ("kernel/drivers/md/dm-crypt.ko".to_string(), "dm-mod"),
            "xts" => continue, // built in, below
            n => (format!("kernel/other/{n}.ko"), ""),
        };
        std::fs::write(m.join(path), fake_module(deps)).unwrap();
    }
    std::fs::write(m.join("kernel/drivers/md/dm-mod.ko"), fake_module("")).unwrap();
    std::fs::write(m.join("modules.builtin"), "kernel/crypto/xts.ko\n").unwrap();
    std::fs::write(dir.join("vmlinuz"), fake_kernel(VERSION)).unwrap();
    std::fs::write(dir.join("guest.toml"), guest_toml("vm-1")).unwrap();
    std::fs::write(
        dir.join("ca.pem"),
        "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    // The agent as far as the builder cares: it says its version (a script: no libraries).
    let agent = dir.join("attesta-guest");
    std::fs::write(&agent, "#!/bin/sh\necho attesta-guest 9.9.9\n").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&agent, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::write(dir.join("ovmf.fd"), measure::synthetic_ovmf(262_144, 5)).unwrap();
    m
}

fn build(dir: &Path, out: &Path, extra: &[&str]) -> std::process::Output {
    image()
        .arg("build")
        .arg("--kernel")
        .arg(dir.join("vmlinuz"))
        .arg("--modules")
        .arg(dir.join("lib/modules").join(VERSION))
        .arg("--guest-config")
        .arg(dir.join("guest.toml"))
        .arg("--broker-ca")
        .arg(dir.join("ca.pem"))
        .arg("--agent")
        .arg(dir.join("attesta-guest"))
        .arg("--out")
        .arg(out)
        .args(extra)
        .output()
        .unwrap()
}

fn ok(o: std::process::Output) -> String {
    assert!(
        o.status.success(),
        "attesta-image failed: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

const OUTPUTS: [&str; 4] = ["vmlinuz", "initrd.img", "cmdline", "manifest.json"];

fn sha256(b: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(b))
}

#[test]
fn identical_inputs_give_byte_identical_images() {
    if !Path::new("/bin/busybox").exists() {
        return missing("/bin/busybox not found (apt-get install busybox-static)");
    }
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    inputs(a.path());
    inputs(b.path());
    // The second set is older, and its files were written in another order: no difference.
    for f in ["vmlinuz", "guest.toml", "ca.pem"] {
        let old = std::fs::File::options()
            .write(true)
            .open(b.path().join(f))
            .unwrap();
        old.set_modified(std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1))
            .unwrap();
    }
    let shape = [
        "--ovmf",
        "OVMF",
        "--vcpus",
        "2",
        "--vcpu-type",
        "EPYC-Milan",
        "--append",
        "attesta.then=poweroff",
    ];
    let with = |d: &Path| {
        let ovmf = d.join("ovmf.fd").display().to_string();
        shape
            .iter()
            .map(|s| {
                if *s == "OVMF" {
                    ovmf.clone()
                } else {
                    s.to_string()
                }
            })
            .collect::<Vec<_>>()
    };
    let (wa, wb) = (with(a.path()), with(b.path()));
    let out_a = ok(build(
        a.path(),
        &a.path().join("img"),
        &wa.iter().map(String::as_str).collect::<Vec<_>>(),
    ));
    ok(build(
        b.path(),
        &b.path().join("elsewhere/img"),
        &wb.iter().map(String::as_str).collect::<Vec<_>>(),
    ));
    for f in OUTPUTS {
        let x = std::fs::read(a.path().join("img").join(f)).unwrap();
        let y = std::fs::read(b.path().join("elsewhere/img").join(f)).unwrap();
        assert!(x == y, "{f} differs between two builds of the same inputs");
    }
    // The manifest: each file's hash, the version the agent reports, the measurement (also
    // printed), which is the launch digest of exactly these files.
    let img = a.path().join("img");
    let m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(img.join("manifest.json")).unwrap()).unwrap();
    for f in ["vmlinuz", "initrd.img", "cmdline"] {
        assert_eq!(
            m["sha256"][f].as_str().unwrap(),
            sha256(&std::fs::read(img.join(f)).unwrap()),
            "{f}"
        );
    }
    assert_eq!(m["attesta_guest_version"], "9.9.9");
    assert_eq!(m["device"], "sev-guest");
    // Every binary in the initramfs, by its hash (the agent's libraries are inputs too).
    assert_eq!(
        m["binaries"]["/usr/bin/attesta-guest"].as_str(),
        Some(sha256(&std::fs::read(a.path().join("attesta-guest")).unwrap()).as_str())
    );
    assert!(m["binaries"]["/bin/busybox"].is_string());
    assert_eq!(m["kernel_version"], VERSION);
    let cmdline = std::fs::read_to_string(img.join("cmdline")).unwrap();
    assert_eq!(
        cmdline,
        "console=ttyS0 panic=-1 net.ifnames=0 attesta.then=poweroff"
    );
    let measurement = m["measurement"].as_str().unwrap().to_string();
    assert_eq!(measurement.len(), 96);
    assert_eq!(measurement, measurement.to_lowercase());
    assert_eq!(out_a.trim(), measurement);
    let recomputed = measure::digest_of_files(&measure::LaunchFiles {
        ovmf: &a.path().join("ovmf.fd"),
        kernel: Some(&img.join("vmlinuz")),
        initrd: Some(&img.join("initrd.img")),
        append: Some(&cmdline),
        vcpus: 2,
        vcpu_type: "EPYC-Milan",
        guest_features: 1,
    })
    .unwrap();
    assert_eq!(hex::encode(recomputed), measurement);
    // The reference tool agrees (installed by the test script).
    match Command::new("sev-snp-measure")
        .args(["--mode", "snp", "--output-format", "hex", "--vcpus", "2"])
        .args(["--vcpu-type", "EPYC-Milan", "--ovmf"])
        .arg(a.path().join("ovmf.fd"))
        .arg("--kernel")
        .arg(img.join("vmlinuz"))
        .arg("--initrd")
        .arg(img.join("initrd.img"))
        .arg("--append")
        .arg(&cmdline)
        .output()
    {
        Ok(o) if o.status.success() => {
            assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), measurement)
        }
        Ok(o) => panic!("sev-snp-measure: {}", String::from_utf8_lossy(&o.stderr)),
        Err(_) => missing("sev-snp-measure not installed (pip install sev-snp-measure)"),
    }
    // The modules the image needs, dependencies first; the built-in one not at all.
    let modules = m["modules"].as_array().unwrap();
    let pos = |p: &str| modules.iter().position(|x| x == p);
    assert!(pos("kernel/drivers/md/dm-mod.ko") < pos("kernel/drivers/md/dm-crypt.ko"));
    assert!(pos("kernel/drivers/md/dm-mod.ko").is_some());
    assert!(!modules.iter().any(|x| x.as_str().unwrap().contains("xts")));

    // Another guest configuration: another initramfs, another measurement.
    std::fs::write(b.path().join("guest.toml"), guest_toml("vm-2")).unwrap();
    ok(build(
        b.path(),
        &b.path().join("vm-2"),
        &wb.iter().map(String::as_str).collect::<Vec<_>>(),
    ));
    let m2: serde_json::Value =
        serde_json::from_slice(&std::fs::read(b.path().join("vm-2/manifest.json")).unwrap())
            .unwrap();
    assert_ne!(m2["sha256"]["initrd.img"], m["sha256"]["initrd.img"]);
    assert_ne!(m2["measurement"], m["measurement"]);
    assert_eq!(m2["sha256"]["vmlinuz"], m["sha256"]["vmlinuz"]);

    // busybox's own cpio reads the archive: every path, nothing else.
    let listing = Command::new("/bin/busybox")
        .args(["cpio", "-t"])
        .stdin(std::fs::File::open(img.join("initrd.img")).unwrap())
        .output()
        .unwrap();
    assert!(listing.status.success());
    let names: Vec<String> = String::from_utf8_lossy(&listing.stdout)
        .lines()
        .map(str::to_string)
        .collect();
    for want in [
        "init",
        "bin/busybox",
        "usr/bin/attesta-guest",
        "etc/attesta/guest.toml",
        "etc/attesta/kbs-ca.crt",
        "etc/attesta/modules",
        "etc/attesta/root-init",
    ] {
        assert!(names.iter().any(|n| n == want), "{want} not in {names:?}");
    }
    let mut sorted = names.clone();
    sorted.sort();
    assert_eq!(names, sorted, "the archive is in path order");
}

#[test]
fn a_broken_input_is_refused_with_its_name() {
    let d = tempfile::tempdir().unwrap();
    inputs(d.path());
    let err = |o: std::process::Output| {
        assert_eq!(o.status.code(), Some(1));
        String::from_utf8_lossy(&o.stderr).into_owned()
    };
    // Modules of another kernel.
    std::fs::write(d.path().join("vmlinuz"), fake_kernel("6.1.0-1-other")).unwrap();
    let e = err(build(d.path(), &d.path().join("x"), &[]));
    assert!(
        e.contains("--modules") && e.contains("6.1.0-1-other"),
        "{e}"
    );
    std::fs::write(d.path().join("vmlinuz"), b"not a kernel").unwrap();
    assert!(err(build(d.path(), &d.path().join("x"), &[])).contains("not a bzImage"));
    std::fs::write(d.path().join("vmlinuz"), fake_kernel(VERSION)).unwrap();
    // A guest path the guest cannot have; a typo'd key.
    std::fs::write(
        d.path().join("guest.toml"),
        guest_toml("vm-1").replace("/etc/attesta/kbs-ca.crt", "kbs-ca.crt"),
    )
    .unwrap();
    assert!(err(build(d.path(), &d.path().join("x"), &[])).contains("broker.ca"));
    std::fs::write(
        d.path().join("guest.toml"),
        guest_toml("vm-1") + "formatt_if_blank = true\n",
    )
    .unwrap();
    assert!(err(build(d.path(), &d.path().join("x"), &[])).contains("--guest-config"));
    // A simulated device only when asked for: never by accident in a production image.
    std::fs::write(
        d.path().join("guest.toml"),
        guest_toml("vm-1") + "[device]\nkind = \"virtio-psp\"\n",
    )
    .unwrap();
    let e = err(build(d.path(), &d.path().join("x"), &[]));
    assert!(
        e.contains("--allow-simulator") && e.contains("virtio-psp"),
        "{e}"
    );
    ok(build(
        d.path(),
        &d.path().join("sim"),
        &["--allow-simulator"],
    ));
    let m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(d.path().join("sim/manifest.json")).unwrap())
            .unwrap();
    assert_eq!(m["device"], "virtio-psp");
    std::fs::write(d.path().join("guest.toml"), guest_toml("vm-1")).unwrap();
    // A module the image needs is missing.
    std::fs::remove_file(
        d.path()
            .join("lib/modules")
            .join(VERSION)
            .join("kernel/drivers/md/dm-mod.ko"),
    )
    .unwrap();
    assert!(err(build(d.path(), &d.path().join("x"), &[])).contains("dm_mod"));
    assert!(!d.path().join("x/manifest.json").exists());
}

/// The real thing: Debian's cloud kernel (`scripts/guest-kernel.sh`), the real attesta-guest,
/// QEMU with TCG. Without /dev/sev-guest the agent must fail, and the boot with it: a panic
/// that pvpanic turns into QEMU's failure status, after the initramfs loaded its modules and
/// brought the network up; the root is never reached.
#[test]
fn a_real_kernel_boots_the_image_and_fails_closed_without_an_snp_device() {
    let Some(kernel_dir) = std::env::var_os("ATTESTA_GUEST_KERNEL").map(PathBuf::from) else {
        return missing("ATTESTA_GUEST_KERNEL not set (bash scripts/guest-kernel.sh)");
    };
    let agent = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug/attesta-guest");
    if !agent.exists() {
        return missing("target/debug/attesta-guest not built (cargo build -p guest-agent)");
    }
    if Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .is_err()
    {
        return missing("qemu-system-x86_64 not installed");
    }
    let (vmlinuz, modules) = attesta_image::qemu::unpacked_kernel(&kernel_dir).unwrap();
    let d = tempfile::tempdir().unwrap();
    inputs(d.path());
    let img = d.path().join("img");
    let build = |out: &Path| {
        image()
            .arg("build")
            .arg("--kernel")
            .arg(&vmlinuz)
            .arg("--modules")
            .arg(&modules)
            .arg("--guest-config")
            .arg(d.path().join("guest.toml"))
            .arg("--broker-ca")
            .arg(d.path().join("ca.pem"))
            .arg("--agent")
            .arg(&agent)
            .args(["--append", "attesta.then=poweroff", "--out"])
            .arg(out)
            .output()
            .unwrap()
    };
    ok(build(&img));
    // Reproducible with the real kernel, modules and agent too.
    ok(build(&d.path().join("again")));
    for f in OUTPUTS {
        assert!(
            std::fs::read(img.join(f)).unwrap()
                == std::fs::read(d.path().join("again").join(f)).unwrap(),
            "{f} differs"
        );
    }
    let disk = d.path().join("disk.img");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    let out = attesta_image::qemu::command(&img, &disk, None, 300)
        .unwrap()
        .output()
        .unwrap();
    let console = String::from_utf8_lossy(&out.stdout);
    for seen in [
        "attesta-init: loading modules",
        "attesta-init: network up: 10.0.2.15/24 via 10.0.2.2",
        "attesta-guest unlock: FAILED (fail closed)",
        "/dev/sev-guest",
        "attesta-init: FAILED (fail closed): attesta-guest exit status 1",
    ] {
        assert!(
            console.contains(seen),
            "{seen:?} not on the console:\n{console}"
        );
    }
    assert!(!console.contains("ATTESTA-ROOT-UP"), "{console}");
    // pvpanic: QEMU ends with a failure status, not a clean power-off.
    assert_eq!(out.status.code(), Some(1), "{console}");
}
