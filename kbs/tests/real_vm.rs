//! A real VM through the whole system, every part the real binary: `attesta-image` builds the
//! image (and its measurement), the operator allows it and signs its order, and the real
//! `attesta-host serve` — on `qemu:///system`, `[snp] mode = "simulated"` — admits the order,
//! registers it with the real `attesta-kbs serve`, creates the blank disk and boots Debian's
//! cloud kernel through libvirt (TCG here) with Debian's OVMF. Its simulated PSP measures what
//! the domain's definition launches and answers the guest over a virtio-serial channel.
//!
//! In the guest the real `attesta-guest` attests, formats LUKS2 with the released key, dm-crypt
//! maps it, a root file system is made on it and switched to, with the tenant's SSH key on
//! tmpfs; the second boot unlocks the same root. Then the miner, root on the host, attacks:
//! a LUKS2 header edited to cipher_null is refused inside the guest; an initrd swapped in the
//! domain's definition (behind the agent's launch gate) is measured by the PSP and denied; a VM
//! the operator terminated at the broker fails closed when the miner boots it again (a guest
//! panic through pvpanic: libvirt reports it crashed, never a root). Last, the agent's own
//! terminate undefines the domain and wipes the disk.

mod common;

use common::{KillOnDrop, free_port, kbs, missing, ok, sibling, sign_allowlist, start};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const URI: &str = "qemu:///system";
const SEED: &str = "real-vm-test";
const OVMF: &str = "/usr/share/ovmf/OVMF.fd";

fn virsh(args: &[&str]) -> std::process::Output {
    Command::new("virsh")
        .args(["-c", URI])
        .args(args)
        .output()
        .unwrap()
}

/// Removes the test's domain however the test ended.
struct Domain(String);

impl Drop for Domain {
    fn drop(&mut self) {
        let _ = virsh(&["destroy", &self.0]);
        let _ = virsh(&["undefine", &self.0]);
    }
}

impl Domain {
    /// `shut off (reason)` once the domain has stopped; panics after `limit`.
    fn wait_off(&self, limit: Duration) -> String {
        let t = Instant::now();
        loop {
            let out = virsh(&["domstate", "--reason", &self.0]);
            let s = String::from_utf8_lossy(&out.stdout).trim().to_string();
            if s.starts_with("shut off") {
                return s;
            }
            assert!(
                t.elapsed() < limit,
                "{} still {s:?} after {limit:?}",
                self.0
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }
}

#[test]
fn a_real_vm_boots_through_the_host_agent_and_the_whole_system() {
    let Some(kernel_dir) = std::env::var_os("ATTESTA_GUEST_KERNEL").map(PathBuf::from) else {
        return missing("ATTESTA_GUEST_KERNEL not set (bash scripts/guest-kernel.sh)");
    };
    for bin in ["attesta-image", "attesta-host", "attesta-guest"] {
        if !sibling(bin).exists() {
            return missing(&format!("{bin} not built (cargo build --workspace)"));
        }
    }
    if !Path::new(OVMF).exists() {
        return missing("no Debian OVMF (apt-get install ovmf)");
    }
    match Command::new("virsh").args(["-c", URI, "version"]).output() {
        Ok(o) if o.status.success() => {}
        _ => {
            return missing(
                "libvirt's QEMU driver is not reachable at qemu:///system (scripts/test.sh starts virtlogd and libvirtd)",
            );
        }
    }
    let (vmlinuz, modules) = attesta_image::qemu::unpacked_kernel(&kernel_dir).unwrap();

    let dir = tempfile::tempdir().unwrap();
    // QEMU runs as libvirt's own user: it must reach the image and the disk (listing nothing).
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
    let p = |n: &str| dir.path().join(n);
    let vm = format!("vm-real-{}", std::process::id());
    let domain = Domain(format!("attesta-{vm}"));
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

    // The image: the guest reaches the broker at QEMU's view of the host's loopback. Measured
    // with Debian's OVMF, as the simulated PSP measures it (an assumed hashes table).
    let image = |name: &str, timeout: u32| -> (PathBuf, String) {
        std::fs::write(
            p("guest.toml"),
            format!(
                "vm_id = \"{vm}\"\n\
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
                .args(["--allow-simulator", "--append", "attesta.then=poweroff"])
                .args(["--ovmf", OVMF, "--vcpus", "1", "--vcpu-type", "EPYC-Milan"])
                .arg("--out")
                .arg(&out)
                .output()
                .unwrap(),
            "attesta-image build",
        );
        (out, stdout.trim().to_string())
    };
    let (img, measurement) = image("img", 30);

    // The operator allows the image's measurement (as the manifest states it) and signs the
    // VM's orders for this chip, with the tenant's SSH key as its boot configuration.
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
            .args(["--vm-id", &vm, "--tenant", "tenant-a"])
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

    // The miner's host agent, simulated SEV-SNP on qemu:///system.
    let operator = std::fs::read_to_string(d.join("operator.pub")).unwrap();
    std::fs::write(
        p("host.toml"),
        format!(
            "libvirt_uri = \"{URI}\"\nstate_dir = \"host-state\"\ncontrol_socket = \"host.sock\"\n\
             operator_keys = [\"{}\"]\nstop_grace_secs = 5\npoll_secs = 1\n\
             [snp]\nmode = \"simulated\"\nrun_dir = \"run\"\n\
             [platform]\nkind = \"simulator\"\nseed = \"{SEED}\"\nstate_dir = \"sim-state\"\n\
             [kbs]\naddress = \"{listen}\"\nserver_name = \"kbs.attesta.local\"\n\
             ca = \"kbs/tls-ca.crt\"\nclient_cert = \"certs/miner-1.crt\"\n\
             client_key = \"certs/miner-1.key\"\n",
            operator.trim()
        ),
    )
    .unwrap();
    let mut agent = Command::new(sibling("attesta-host"))
        .arg("serve")
        .arg("--config")
        .arg(p("host.toml"))
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let agent_log = Arc::new(Mutex::new(String::new()));
    {
        let log = agent_log.clone();
        let stderr = agent.stderr.take().unwrap();
        std::thread::spawn(move || {
            for l in BufReader::new(stderr).lines().map_while(Result::ok) {
                log.lock().unwrap().push_str(&(l + "\n"));
            }
        });
    }
    let _agent = KillOnDrop(agent);
    let host = |args: &[&str]| -> std::process::Output {
        let t = Instant::now();
        loop {
            let out = Command::new(sibling("attesta-host"))
                .args(args)
                .arg("--config")
                .arg(p("host.toml"))
                .output()
                .unwrap();
            // Until the agent listens, the control socket is not there yet.
            let waiting = String::from_utf8_lossy(&out.stderr).contains("host.sock")
                && t.elapsed() < Duration::from_secs(30);
            if !waiting {
                return out;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    let console = || std::fs::read_to_string(p(&format!("run/{}.console", domain.0))).unwrap();
    let boot_limit = Duration::from_secs(300);

    let img_file = |f: &str| img.join(f).display().to_string();
    let cmdline = std::fs::read_to_string(img.join("cmdline")).unwrap();
    let disk = p("disk.img");
    std::fs::write(
        p("vm.toml"),
        format!(
            "vm_id = \"{vm}\"\nvcpus = 1\nmemory_mib = 512\nvcpu_type = \"EPYC-Milan\"\n\
             user_network = true\n\
             [boot]\novmf = \"{OVMF}\"\nkernel = \"{}\"\ninitrd = \"{}\"\ncmdline = \"{}\"\n\
             [disk]\npath = \"{}\"\nsize_gib = 1\n",
            img_file("vmlinuz"),
            img_file("initrd.img"),
            cmdline.trim(),
            disk.display()
        ),
    )
    .unwrap();

    // First boot: admitted, registered with the broker, the disk created blank; in the guest:
    // attest, format, make the root, switch to it, keys on tmpfs.
    let out = host(
        &[
            "vm",
            "create",
            "--spec",
            p("vm.toml").to_str().unwrap(),
            "--order",
        ]
        .iter()
        .copied()
        .chain([p("register.signed").to_str().unwrap(), "--start"])
        .collect::<Vec<_>>(),
    );
    let created = ok(out, "attesta-host vm create");
    assert!(
        created.contains("registered with the broker") && created.contains(&measurement),
        "{created}"
    );
    let how = domain.wait_off(boot_limit);
    let c = console();
    for seen in [
        "formatted and unlocked (generation 1, boot 1) as /dev/mapper/attesta-root",
        "attesta-init: first boot: making the root file system",
        "ATTESTA-ROOT-UP boots_on_this_root=1 authorized_keys=1",
        "ATTESTA-KEYS-ON-DISK bytes=0",
    ] {
        assert!(c.contains(seen), "first boot: {seen:?} missing:\n{c}");
    }
    assert_eq!(how, "shut off (shutdown)", "first boot powers off:\n{c}");
    let header = std::fs::read(&disk).unwrap();
    assert_eq!(&header[..6], b"LUKS\xba\xbe", "the disk is LUKS2 now");
    assert!(
        !header
            .windows(b"tenant@laptop".len())
            .any(|w| w == b"tenant@laptop"),
        "the SSH key never reaches the disk in clear"
    );

    // Second boot: the same root, unlocked (not formatted again).
    ok(host(&["vm", "start", &vm]), "attesta-host vm start");
    let how = domain.wait_off(boot_limit);
    let c = console();
    assert!(
        c.contains("unlocked (generation 1, boot 2)")
            && !c.contains("formatted and unlocked")
            && c.contains("ATTESTA-ROOT-UP boots_on_this_root=2 authorized_keys=1")
            && c.contains("ATTESTA-KEYS-ON-DISK bytes=0"),
        "second boot:\n{c}"
    );
    assert_eq!(how, "shut off (shutdown)", "{c}");

    // The miner edits the LUKS2 header to cipher_null (checksums fixed): the key is released,
    // and the guest refuses the disk before activating anything.
    let saved = std::fs::read(&disk).unwrap();
    let forged = guest_agent::header::forge_json_edit(&saved, |t| {
        *t = t.replacen("\"aes-xts-plain64\"", "\"cipher_null-ecb\"", 2)
    })
    .unwrap();
    let mut f = std::fs::OpenOptions::new().write(true).open(&disk).unwrap();
    std::io::Write::write_all(&mut f, &forged).unwrap();
    drop(f);
    ok(host(&["vm", "start", &vm]), "attesta-host vm start");
    let how = domain.wait_off(boot_limit);
    let c = console();
    assert!(
        c.contains(
            "refusing the LUKS2 header: the header names the data cipher \"cipher_null-ecb\""
        ) && c.contains("attesta-init: FAILED (fail closed)")
            && !c.contains("ATTESTA-ROOT-UP"),
        "tampered header:\n{c}"
    );
    assert_eq!(how, "shut off (crashed)", "a panic through pvpanic:\n{c}");
    std::fs::write(&disk, &saved).unwrap();

    // The miner swaps the initrd in the domain's definition, behind the agent's launch gate
    // (which measures the spec): the PSP measures what the domain launches, the broker denies.
    let (swapped, other) = image("swapped", 31);
    assert_ne!(other, measurement);
    let original = String::from_utf8(virsh(&["dumpxml", "--inactive", &domain.0]).stdout).unwrap();
    let edited = original.replace(
        &img_file("initrd.img"),
        &swapped.join("initrd.img").display().to_string(),
    );
    assert_ne!(edited, original);
    // Behind the agent's back: `virsh define` of an edited definition.
    let redefine = |xml: &str| {
        std::fs::write(p("domain.xml"), xml).unwrap();
        let defined = virsh(&["define", p("domain.xml").to_str().unwrap()]);
        assert!(defined.status.success(), "{defined:?}");
    };
    redefine(&edited);
    ok(host(&["vm", "start", &vm]), "attesta-host vm start");
    let how = domain.wait_off(boot_limit);
    let c = console();
    assert!(
        c.contains("measurement_not_allowed")
            && c.contains("attesta-init: FAILED (fail closed)")
            && !c.contains("ATTESTA-ROOT-UP"),
        "swapped initrd:\n{c}"
    );
    assert_eq!(how, "shut off (crashed)", "{c}");
    assert!(
        agent_log.lock().unwrap().contains(&other),
        "the PSP measured the swapped launch:\n{}",
        agent_log.lock().unwrap()
    );

    // QEMU arguments through libvirt's qemu namespace could load another initrd unmeasured:
    // the agent refuses to start such a definition.
    redefine(
        &original
            .replacen(
                "<domain type=",
                "<domain xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0' type=",
                1,
            )
            .replace(
                "</devices>",
                "</devices><qemu:commandline><qemu:arg value='-initrd'/><qemu:arg value='/evil'/></qemu:commandline>",
            ),
    );
    let out = host(&["vm", "start", &vm]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("commandline"),
        "{err}"
    );
    redefine(&original);
    // Started behind the agent's back, the domain finds no PSP (each launch's PSP serves only
    // the QEMU it was started for) and does not start.
    let started = virsh(&["start", &domain.0]);
    assert!(
        !started.status.success() && String::from_utf8_lossy(&started.stderr).contains(".psp"),
        "the start fails on the missing PSP socket: {started:?}"
    );
    assert_eq!(
        String::from_utf8_lossy(&virsh(&["domstate", &domain.0]).stdout).trim(),
        "shut off"
    );

    // The operator terminates the VM at the broker; the miner boots it again: it fails closed.
    ok(
        kbs()
            .args(["vm", "terminate"])
            .arg(p("terminate.signed"))
            .args(["--kbs", &listen, "--ca"])
            .arg(d.join("tls-ca.crt"))
            .arg("--cert")
            .arg(p("certs/miner-1.crt"))
            .arg("--key")
            .arg(p("certs/miner-1.key"))
            .output()
            .unwrap(),
        "terminate at the broker",
    );
    ok(host(&["vm", "start", &vm]), "attesta-host vm start");
    let how = domain.wait_off(boot_limit);
    let c = console();
    assert!(
        c.contains("vm_terminated")
            && c.contains("attesta-init: FAILED (fail closed)")
            && !c.contains("ATTESTA-ROOT-UP"),
        "terminated:\n{c}"
    );
    assert_eq!(how, "shut off (crashed)", "{c}");

    // The agent's terminate: the broker has nothing left to shred; the domain is undefined and
    // the disk wiped and removed.
    let out = ok(
        host(&[
            "vm",
            "terminate",
            &vm,
            "--order",
            p("terminate.signed").to_str().unwrap(),
        ]),
        "attesta-host vm terminate",
    );
    assert!(out.contains("terminated"), "{out}");
    assert!(!disk.exists(), "the disk is wiped and removed");
    assert!(
        !virsh(&["dominfo", &domain.0]).status.success(),
        "the domain is undefined"
    );
}
