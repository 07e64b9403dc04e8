//! The demo's real-VM scene: N real VMs — Debian's cloud kernel and OVMF under QEMU (TCG where
//! KVM cannot run it), an `attesta-image` initramfs with the real `attesta-guest` — created and
//! started by a host agent on the system libvirt (`qemu:///system`, `[snp] mode =
//! "simulated"`) through the launch gate and a signed order, its simulated PSP measuring what
//! each domain launches, against a broker of their own. Each VM boots twice (formatted and
//! rooted, then unlocked); the first one also meets the miner's attacks: its LUKS2 header
//! edited to cipher_null, its initrd swapped by redefining the domain behind the agent's gate,
//! and its next boot after termination. Every VM is then terminated through the agent. What
//! the summary's `real_vms` says is what the consoles and libvirt showed.
//!
//! Where Garage is installed, the first VM is also backed up to S3 after its second boot and
//! restored by a second host agent on another chip, as a miner's machine that is lost would
//! be replaced ([`super::backup`]); it boots and unlocks there, and the attacks and the
//! terminate happen on that host.

use super::vm_host::{OVMF, URI, host_agent, virsh};
use crate::demo::{Stack, StackOptions, order, stack_with};
use attesta_image::build::{Inputs, Launch};
use proto::order::{Allowlist, ORDER_VERSION, OrderKind};
use serde_bytes::ByteBuf;
use simulator::{ChipConfig, Pki};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Instant;

/// What the real VMs showed.
#[derive(Debug, Default)]
pub struct RealVms {
    pub booted: usize,
    pub unlocked_in_guest: usize,
    pub second_boot_unlocked: usize,
    pub terminated_failed_closed: bool,
    pub swapped_initrd_denied: bool,
    pub tampered_header_refused: bool,
    /// QEMU start to the agent's "unlocked" line, per boot that unlocked.
    pub boot_to_unlocked_ms: Vec<f64>,
    /// The same boots: QEMU start to the initramfs's first line (firmware and kernel: the
    /// baseline), and to the power-off (the whole boot).
    pub boot_to_init_ms: Vec<f64>,
    pub whole_boot_ms: Vec<f64>,
    /// With `--bench-unlock`: each unlocked boot's in-guest figures (the kernel's uptime when
    /// the agent had mapped the root, and an argon2id passphrase unlock of the same disk with
    /// cryptsetup's defaults, timed right after in the same VM).
    pub bench: Vec<serde_json::Value>,
    /// The first VM's backup and restore on the other host, where S3 storage was at hand.
    pub backup: Option<super::backup::BackupRun>,
}

impl RealVms {
    /// With `bench`, every unlocked boot must also have its benchmark figures.
    pub fn as_expected(&self, n: usize, bench: bool) -> bool {
        let benched = !bench
            || (self.bench.len() == 2 * n
                && self.bench.iter().all(|b| {
                    b.get("failed").is_none() && b["passphrase_unlock_ms"].as_f64().is_some()
                }));
        let restored = usize::from(self.backup.is_some());
        benched
            && self.backup.as_ref().is_none_or(|b| b.as_expected())
            && self.booted == 2 * n + 3 + restored
            && self.unlocked_in_guest == n
            && self.second_boot_unlocked == n
            && self.terminated_failed_closed
            && self.swapped_initrd_denied
            && self.tampered_header_refused
    }

    pub fn percentile(&self, p: f64) -> Option<f64> {
        pct(&self.boot_to_unlocked_ms, p)
    }

    /// The real VMs' part of the JSON summary (`real_vms`); `ok` as [`Self::as_expected`] said.
    pub fn json(&self, ok: bool) -> serde_json::Value {
        serde_json::json!({
            "booted": self.booted,
            "unlocked_in_guest": self.unlocked_in_guest,
            "second_boot_unlocked": self.second_boot_unlocked,
            "terminated_failed_closed": self.terminated_failed_closed,
            "swapped_initrd_denied": self.swapped_initrd_denied,
            "tampered_header_refused": self.tampered_header_refused,
            "boot_to_unlocked_ms": {"p50": self.percentile(50.0), "p99": self.percentile(99.0)},
            "boot_to_init_ms": {"p50": pct(&self.boot_to_init_ms, 50.0), "p99": pct(&self.boot_to_init_ms, 99.0)},
            "whole_boot_ms": {"p50": pct(&self.whole_boot_ms, 50.0), "p99": pct(&self.whole_boot_ms, 99.0)},
            "bench": self.bench,
            "ok": ok,
        })
    }

    /// The real VMs' part of the text summary.
    pub fn print(&self) {
        let yes = |b: bool| if b { "yes" } else { "NO" };
        println!(
            "  real VMs (host agent on qemu:///system, Debian's cloud kernel, dm-crypt in the guest): {} boots; {} formatted, rooted and unlocked in the guest, {} unlocked again on their second boot; boot to unlocked p50 {:.0} ms",
            self.booted,
            self.unlocked_in_guest,
            self.second_boot_unlocked,
            self.percentile(50.0).unwrap_or(f64::NAN)
        );
        println!(
            "    cipher_null header refused in the guest: {}; swapped initrd denied: {}; terminated VM failed closed: {}",
            yes(self.tampered_header_refused),
            yes(self.swapped_initrd_denied),
            yes(self.terminated_failed_closed)
        );
        match &self.backup {
            Some(b) => b.print(),
            None => println!("  backup: none (Garage not installed: scripts/s3-deps.sh)"),
        }
        for b in &self.bench {
            println!(
                "    bench, {} boot {}: kernel start to root mapped {} ms; argon2id passphrase unlock (cryptsetup defaults: {} KiB, t={}, p={}) {} ms",
                b["vm"],
                b["boot"],
                b["kernel_to_unlocked_ms"],
                b["memory_kib"],
                b["time_cost"],
                b["threads"],
                b["passphrase_unlock_ms"]
            );
        }
    }
}

/// The `p`th percentile of `v` (nearest rank).
pub fn pct(v: &[f64], p: f64) -> Option<f64> {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    let i = ((v.len() as f64 - 1.0) * p / 100.0).round() as usize;
    v.get(i).copied()
}

/// Where the scene's parts are.
pub struct Parts {
    /// An unpacked Debian cloud kernel (`boot/vmlinuz-*`, `lib/modules/*`).
    pub kernel_dir: PathBuf,
    /// An `attesta-guest` built with the `simulator` feature (its virtio-psp device).
    pub agent: PathBuf,
    pub busybox: PathBuf,
}

impl Parts {
    /// What this machine has, or why the scene cannot run: `ATTESTA_GUEST_KERNEL` or
    /// `/var/cache/attesta/guest-kernel/*` (scripts/guest-kernel.sh), the agent beside this
    /// program, busybox, QEMU, OVMF and the system libvirt.
    pub fn find() -> Result<Parts, String> {
        let kernel_dir = match std::env::var_os("ATTESTA_GUEST_KERNEL") {
            Some(d) => PathBuf::from(d),
            None => std::fs::read_dir("/var/cache/attesta/guest-kernel")
                .ok()
                .and_then(|d| {
                    d.flatten()
                        .map(|e| e.path())
                        .find(|p| p.join("boot").is_dir())
                })
                .ok_or(
                    "no guest kernel (run scripts/guest-kernel.sh, or set ATTESTA_GUEST_KERNEL)",
                )?,
        };
        let agent = std::env::current_exe()
            .ok()
            .and_then(|p| p.parent().map(|d| d.join("attesta-guest")))
            .filter(|p| p.is_file())
            .ok_or("no attesta-guest beside attesta-sim (cargo build -p guest-agent --features simulator)")?;
        let busybox = PathBuf::from("/bin/busybox");
        if !busybox.is_file() {
            return Err("no /bin/busybox (apt-get install busybox-static)".into());
        }
        if Command::new("qemu-system-x86_64")
            .arg("--version")
            .output()
            .is_err()
        {
            return Err(
                "no qemu-system-x86_64 (apt-get install -t bookworm-backports qemu-system-x86)"
                    .into(),
            );
        }
        if !Path::new(OVMF).is_file() {
            return Err(format!("no {OVMF} (apt-get install ovmf)"));
        }
        if virsh(&["version"]).is_err() {
            return Err(format!(
                "{URI} is not reachable (bash scripts/libvirt-up.sh starts libvirtd and virtlogd)"
            ));
        }
        Ok(Parts {
            kernel_dir,
            agent,
            busybox,
        })
    }

    fn kernel(&self) -> Result<(PathBuf, PathBuf), String> {
        attesta_image::qemu::unpacked_kernel(&self.kernel_dir)
    }
}

/// The agent's `bench:` line in a console, as JSON (numbers where they are numbers).
fn bench_line(console: &str, vm: &str, boot: usize) -> Option<serde_json::Value> {
    let line = console
        .lines()
        .find_map(|l| l.split_once("attesta-guest: bench: ").map(|(_, b)| b))?;
    let mut j = serde_json::json!({"vm": vm, "boot": boot});
    if let Some(why) = line.strip_prefix("failed: ") {
        j["failed"] = serde_json::json!(why);
        return Some(j);
    }
    for kv in line.split_whitespace() {
        let Some((k, v)) = kv.split_once('=') else {
            j["failed"] = serde_json::json!(format!("unreadable: {line}"));
            return Some(j);
        };
        j[k] = match v.parse::<f64>() {
            Ok(n) if n.is_finite() => serde_json::json!(n),
            _ => serde_json::json!(v),
        };
    }
    Some(j)
}

/// Every folder above `dir` must let QEMU (libvirt's user, not ours) through to the images
/// and disks.
fn reachable_by_qemu(dir: &Path) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    for d in dir.ancestors().skip(1) {
        if let Ok(m) = std::fs::metadata(d)
            && m.permissions().mode() & 0o001 == 0
        {
            return Err(format!(
                "{} is not traversable by others (QEMU runs as libvirt's user): chmod o+x it, or use another --dir",
                d.display()
            ));
        }
    }
    Ok(())
}

/// The simulated hierarchy the host agent's chip comes from: chip 0 of what `seed` makes
/// (cached under `state`), whose root is `root`.
pub struct Hierarchy<'a> {
    pub root: &'a Arc<Pki>,
    pub seed: &'a str,
    pub state: &'a Path,
}

/// Runs the scene in `dir` with `n` VMs on chip 0 of `h`.
pub async fn run(
    dir: &Path,
    n: usize,
    h: &Hierarchy<'_>,
    parts: &Parts,
    bench: bool,
    progress: &dyn Fn(&str),
) -> Result<RealVms, String> {
    let Hierarchy { root, seed, state } = *h;
    let e = |x: &dyn std::fmt::Display| x.to_string();
    std::fs::create_dir_all(dir).map_err(|x| e(&x))?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o711)).map_err(|x| e(&x))?;
    }
    reachable_by_qemu(dir)?;
    let Stack {
        kbs,
        broker,
        operator,
        allowlist_key,
    } = stack_with(dir, StackOptions::trusting(root, [0; 48])).await?;
    let (vmlinuz, modules) = parts.kernel()?;
    let ovmf = PathBuf::from(OVMF);
    let ca = dir.join("kbs-ca.crt");
    std::fs::write(&ca, snp::certs::pem_encode("CERTIFICATE", &broker.ca_der))
        .map_err(|x| e(&x))?;
    let port = broker.addr.port();
    let image = |vm: &str, out: &Path, timeout: u32| -> Result<String, String> {
        let cfg = dir.join(format!("{vm}.toml"));
        std::fs::write(
            &cfg,
            format!(
                "vm_id = \"{vm}\"\n{}[broker]\naddress = \"10.0.2.2:{port}\"\n\
                 server_name = \"{}\"\nca = \"/etc/attesta/kbs-ca.crt\"\n\
                 response_key = \"{}\"\ntimeout_secs = {timeout}\n\
                 [disk]\npath = \"/dev/vda\"\n[device]\nkind = \"virtio-psp\"\n",
                if bench {
                    "bench_passphrase = true\n"
                } else {
                    ""
                },
                broker.server_name,
                hex::encode(broker.response_key),
            ),
        )
        .map_err(|x| e(&x))?;
        let built = attesta_image::build::build(
            &Inputs {
                kernel: vmlinuz.clone(),
                modules: modules.clone(),
                guest_config: cfg,
                broker_ca: ca.clone(),
                append: Some("attesta.then=poweroff".into()),
                agent: parts.agent.clone(),
                busybox: parts.busybox.clone(),
                launch: Some(Launch {
                    ovmf: ovmf.clone(),
                    vcpus: 1,
                    vcpu_type: "EPYC-Milan".into(),
                    guest_features: 1,
                }),
                allow_simulator: true,
            },
            out,
            &|_| {},
        )
        .map_err(|x| format!("attesta-image: {x}"))?;
        Ok(built.manifest["measurement"]
            .as_str()
            .unwrap_or_default()
            .to_string())
    };

    progress(&format!("real VMs: building {n} images"));
    // VM ids unique to this run: the system libvirt is shared with anything else running.
    let run_id = format!("{:08x}", std::process::id());
    let mut vms = Vec::new();
    for i in 0..n {
        let vm = format!("real-{run_id}-{i}");
        let img = dir.join(&vm);
        let m = image(&vm, &img, 30)?;
        let mut bytes = [0u8; 48];
        hex::decode_to_slice(&m, &mut bytes).map_err(|x| format!("{vm}: {x}"))?;
        vms.push((vm, img, bytes));
    }
    // The operator allows the images' measurements (from their manifests) and registers them.
    let allow = Allowlist {
        v: ORDER_VERSION,
        epoch: 2,
        measurements: vms.iter().map(|v| ByteBuf::from(v.2.to_vec())).collect(),
    };
    let allow_pub: [u8; 32] = {
        use aws_lc_rs::signature::KeyPair;
        allowlist_key
            .public_key()
            .as_ref()
            .try_into()
            .map_err(|_| "the allowlist key is not Ed25519".to_string())?
    };
    let now = crate::demo::now();
    kbs.set_allowlist(&allow.sign(&allowlist_key), &allow_pub, now)
        .await
        .map_err(|x| e(&x))?;
    let chip = ChipConfig::typical(root, 0);
    let storage = match n {
        0 => None,
        _ => super::backup::Storage::start(dir)?,
    };
    // The first VM may also run on chip 1, where the second host agent restores its backup.
    let chip1 = ChipConfig::typical(root, 1);
    let order_of = |vm: &str, i: usize, m: &[u8; 48]| {
        let mut o = order(vm, i, &chip.chip_id, m);
        if i == 0 && storage.is_some() {
            o.chip_ids.push(ByteBuf::from(chip1.chip_id.to_vec()));
        }
        o
    };
    for (i, (vm, _, m)) in vms.iter().enumerate() {
        kbs.register(&order_of(vm, i, m).sign(&operator), now)
            .await
            .map_err(|x| format!("{vm}: {x}"))?;
    }

    // The miner's host agent: simulated SEV-SNP on the system libvirt, its PSP signing as
    // chip 0 of the hierarchy the broker trusts.
    progress("real VMs: starting the host agent (qemu:///system, simulated SEV-SNP)");
    let op_hex = hex::encode(crate::demo::pk(&operator));
    let host = |name: &str, chip: u64| {
        let home = dir.join(name);
        let storage = &storage;
        let op_hex = &op_hex;
        async move {
            std::fs::create_dir_all(&home).map_err(|x| e(&x))?;
            let backup = match storage {
                Some(s) => s.toml(&home)?,
                None => String::new(),
            };
            host_agent(&home, op_hex, seed, state, chip, &backup).await
        }
    };
    let mut agent = host("host", 0).await?;
    let b64 = |b: &[u8]| {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD.encode(b)
    };

    let mut r = RealVms::default();
    for (i, (vm, img, m)) in vms.iter().enumerate() {
        let mut disk = dir.join(format!("{vm}.img"));
        let cmdline = std::fs::read_to_string(img.join("cmdline")).map_err(|x| e(&x))?;
        let spec = format!(
            "vm_id = \"{vm}\"\nvcpus = 1\nmemory_mib = 512\nvcpu_type = \"EPYC-Milan\"\n\
             user_network = true\n\
             [boot]\novmf = \"{OVMF}\"\nkernel = \"{}\"\ninitrd = \"{}\"\ncmdline = \"{}\"\n\
             [disk]\npath = \"{}\"\nsize_gib = 1\n",
            img.join("vmlinuz").display(),
            img.join("initrd.img").display(),
            cmdline.trim(),
            disk.display()
        );
        agent.domains.push(host_agent::spec::domain_name(vm));
        for (n, expect) in [
            (1, "formatted and unlocked"),
            (2, "unlocked (generation 1, boot 2)"),
        ] {
            progress(&format!("real VMs: {vm} boot {n} (through the host agent)"));
            let b = if n == 1 {
                // Admitted by the launch gate against the signed order, a blank disk, a
                // domain, and started: the agent's PSP measures what the domain launches.
                let t = Instant::now();
                agent
                    .ask(host_agent::control::ControlRequest::Create {
                        spec: spec.clone(),
                        order: b64(&order_of(vm, i, m).sign(&operator)),
                        start: true,
                    })
                    .await
                    .map_err(|x| format!("{vm}: host agent: create: {x}"))?;
                agent.boot(vm, t).await?
            } else {
                agent.start(vm).await?
            };
            r.booted += 1;
            let up = b.ended == "shutdown"
                && b.console.contains(expect)
                && b.console
                    .contains(&format!("ATTESTA-ROOT-UP boots_on_this_root={n}"));
            if up {
                if n == 1 {
                    r.unlocked_in_guest += 1;
                } else {
                    r.second_boot_unlocked += 1;
                }
                r.boot_to_unlocked_ms.extend(b.unlocked_ms);
                r.boot_to_init_ms.extend(b.init_ms);
                r.whole_boot_ms.push(b.whole_ms);
                r.bench.extend(bench_line(&b.console, vm, n));
            } else {
                progress("");
                eprintln!(
                    "{vm} boot {n} did not come up ({}):\n{}",
                    b.ended, b.console
                );
            }
        }
        let mut t = order(vm, i, &chip.chip_id, m);
        t.kind = OrderKind::Terminate;
        let terminate = t.sign(&operator);
        if let (0, Some(_)) = (i, &storage) {
            progress(&format!(
                "real VMs: {vm} backed up to S3, restored on another host"
            ));
            let b = super::backup::BackupRun {
                bytes: agent
                    .answer(host_agent::control::ControlRequest::Backup { vm_id: vm.clone() })
                    .await
                    .map_err(|x| format!("{vm}: host agent: backup: {x}"))?["bytes_uploaded"]
                    .as_u64()
                    .unwrap_or(0),
                ..Default::default()
            };
            // The first machine is lost (its domain goes with it); a second host agent, on
            // chip 1, restores the disk from the bucket and starts the VM there.
            let domain = host_agent::spec::domain_name(vm);
            virsh(&["undefine", &domain])?;
            agent.domains.retain(|d| *d != domain);
            let lost = std::mem::replace(&mut agent, host("host-b", 1).await?);
            drop(lost);
            let moved = dir.join(format!("{vm}-b.img"));
            let t = Instant::now();
            let restored = agent
                .ask(host_agent::control::ControlRequest::Restore {
                    spec: spec.replace(&disk.display().to_string(), &moved.display().to_string()),
                    order: b64(&order_of(vm, i, m).sign(&operator)),
                    backup: None,
                    start: true,
                })
                .await;
            agent.domains.push(domain);
            disk = moved;
            r.backup = Some(super::backup::BackupRun {
                restored_on_other_host: restored.is_ok(),
                ..b
            });
            restored.map_err(|x| format!("{vm}: host agent: restore: {x}"))?;
            let b = agent.boot(vm, t).await?;
            r.booted += 1;
            if let Some(run) = &mut r.backup {
                // The volume the guest unlocks is the one it made: its root counts a third boot.
                run.unlocked_after_restore = b.ended == "shutdown"
                    && b.console.contains(" unlocked (generation 1")
                    && b.console.contains("ATTESTA-ROOT-UP boots_on_this_root=3");
            }
            if !r.backup.as_ref().is_some_and(|b| b.unlocked_after_restore) {
                eprintln!(
                    "{vm} after its restore did not come up ({}):\n{}",
                    b.ended, b.console
                );
            }
        }
        if i == 0 {
            // The miner's attacks on the first VM, each on the disk or the definition while
            // the VM is off, then a start through the agent.
            progress(&format!("real VMs: {vm} with a cipher_null header"));
            let mut f = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&disk)
                .map_err(|x| e(&x))?;
            let mut meta = vec![0u8; 8 << 20];
            {
                use std::io::{Read, Seek, Write};
                f.read_exact(&mut meta).map_err(|x| e(&x))?;
                let forged = guest_agent::header::forge_json_edit(&meta, |t| {
                    *t = t.replacen("\"aes-xts-plain64\"", "\"cipher_null-ecb\"", 2)
                })?;
                f.seek(std::io::SeekFrom::Start(0)).map_err(|x| e(&x))?;
                f.write_all(&forged).map_err(|x| e(&x))?;
                f.sync_all().map_err(|x| e(&x))?;
                let b = agent.start(vm).await?;
                r.booted += 1;
                r.tampered_header_refused =
                    b.failed_closed("\"cipher_null-ecb\", not aes-xts-plain64");
                f.seek(std::io::SeekFrom::Start(0)).map_err(|x| e(&x))?;
                f.write_all(&meta[..forged.len()]).map_err(|x| e(&x))?;
                f.sync_all().map_err(|x| e(&x))?;
            }

            progress(&format!("real VMs: {vm} with a swapped initrd"));
            let swapped = dir.join(format!("{vm}-swapped"));
            image(vm, &swapped, 31)?;
            let domain = host_agent::spec::domain_name(vm);
            let defined = virsh(&["dumpxml", "--inactive", &domain])?;
            let initrd = img.join("initrd.img").display().to_string();
            if !defined.contains(&initrd) {
                return Err(format!("{vm}: the definition does not boot {initrd}"));
            }
            // Redefined behind the agent's launch gate, which judged the spec on record.
            let redefine = |xml: &str| -> Result<(), String> {
                let f = dir.join(format!("{vm}-domain.xml"));
                std::fs::write(&f, xml).map_err(|x| e(&x))?;
                virsh(&["define", &f.display().to_string()]).map(|_| ())
            };
            redefine(&defined.replace(&initrd, &swapped.join("initrd.img").display().to_string()))?;
            let b = agent.start(vm).await?;
            r.booted += 1;
            r.swapped_initrd_denied = b.failed_closed("measurement_not_allowed");
            redefine(&defined)?;

            progress(&format!("real VMs: {vm} terminated at the broker"));
            kbs.terminate(&terminate, crate::demo::now())
                .await
                .map_err(|x| format!("{vm}: terminate: {x}"))?;
            let b = agent.start(vm).await?;
            r.booted += 1;
            r.terminated_failed_closed = b.failed_closed("vm_terminated");
        } else {
            kbs.terminate(&terminate, crate::demo::now())
                .await
                .map_err(|x| format!("{vm}: terminate: {x}"))?;
        }
        // The agent destroys, undefines and wipes it.
        let ended = agent
            .answer(host_agent::control::ControlRequest::Terminate {
                vm_id: vm.clone(),
                order: b64(&terminate),
            })
            .await
            .map_err(|x| format!("{vm}: host agent: terminate: {x}"))?;
        agent
            .domains
            .retain(|d| *d != host_agent::spec::domain_name(vm));
        if let (0, Some(s), Some(run)) = (i, &storage, &mut r.backup) {
            // The agent says it deleted some, and the bucket (listed around it) has none left.
            let said = ended["backups"]
                .as_str()
                .and_then(|b| b.strip_suffix(" objects deleted"))
                .and_then(|n| n.parse::<u64>().ok());
            run.deleted_on_terminate = said.is_some_and(|n| n > 0) && s.objects(vm).await? == 0;
        }
    }
    progress("");
    Ok(r)
}
