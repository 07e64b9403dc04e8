//! The demo's real-VM scene: N real VMs — Debian's cloud kernel under QEMU (TCG where KVM
//! cannot run it), an `attesta-image` initramfs with the real `attesta-guest`, a simulated PSP
//! on a virtio-serial port that measured what QEMU was given — against a broker of their own.
//! Each VM boots twice (formatted and rooted, then unlocked); the first one also meets the
//! host's attacks: its LUKS2 header edited to cipher_null, its initrd swapped, and its next
//! boot after termination. What the summary's `real_vms` says is what the consoles showed.

use crate::demo::{Stack, StackOptions, order, stack_with};
use attesta_image::build::{Inputs, Launch};
use proto::order::{Allowlist, ORDER_VERSION, OrderKind};
use serde_bytes::ByteBuf;
use simulator::{Chip, ChipConfig, GuestLaunch, Pki};
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
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
}

impl RealVms {
    pub fn as_expected(&self, n: usize) -> bool {
        self.booted == 2 * n + 3
            && self.unlocked_in_guest == n
            && self.second_boot_unlocked == n
            && self.terminated_failed_closed
            && self.swapped_initrd_denied
            && self.tampered_header_refused
    }

    pub fn percentile(&self, p: f64) -> Option<f64> {
        pct(&self.boot_to_unlocked_ms, p)
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
    /// program, busybox, QEMU.
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

/// A simulated PSP for one launch, serving on `socket` until dropped: measures the files.
struct Psp {
    measurement: [u8; 48],
    _server: simulator::psp::Server,
}

impl Psp {
    fn start(
        root: &Arc<Pki>,
        chip: &ChipConfig,
        ovmf: &Path,
        img: &Path,
        socket: &Path,
    ) -> Result<Psp, String> {
        let cmdline = std::fs::read_to_string(img.join("cmdline")).map_err(|e| e.to_string())?;
        let measurement = measure::digest_of_files(&measure::LaunchFiles {
            ovmf,
            kernel: Some(&img.join("vmlinuz")),
            initrd: Some(&img.join("initrd.img")),
            append: Some(&cmdline),
            vcpus: 1,
            vcpu_type: "EPYC-Milan",
            guest_features: 1,
        })?;
        let chip = Chip::new(root.clone(), chip.clone()).map_err(|e| e.to_string())?;
        let launch = GuestLaunch {
            measurement,
            policy: 0x30000,
            ..Default::default()
        };
        Ok(Psp {
            measurement,
            _server: simulator::psp::Server::start(chip, launch, socket)?,
        })
    }
}

/// One boot: the console, QEMU's status, and when the agent said "unlocked".
struct Boot {
    console: String,
    status: Option<i32>,
    init_ms: Option<f64>,
    unlocked_ms: Option<f64>,
    whole_ms: f64,
}

fn boot(img: &Path, socket: &Path, disk: &Path) -> Result<Boot, String> {
    let start = Instant::now();
    let mut child = attesta_image::qemu::command(img, disk, Some(socket), 600)?
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("qemu-system-x86_64: {e}"))?;
    let mut console = String::new();
    let (mut init_ms, mut unlocked_ms) = (None, None);
    let ms = || start.elapsed().as_secs_f64() * 1000.0;
    if let Some(out) = child.stdout.take() {
        for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
            if init_ms.is_none() && line.contains("attesta-init: ") {
                init_ms = Some(ms());
            }
            if unlocked_ms.is_none() && line.contains(" unlocked (generation ") {
                unlocked_ms = Some(ms());
            }
            console.push_str(&line);
            console.push('\n');
        }
    }
    let status = child.wait().map_err(|e| e.to_string())?.code();
    Ok(Boot {
        console,
        status,
        init_ms,
        unlocked_ms,
        whole_ms: ms(),
    })
}

fn failed_closed(b: &Boot, reason: &str) -> bool {
    b.status == Some(1)
        && b.console.contains(reason)
        && b.console.contains("attesta-init: FAILED (fail closed)")
        && !b.console.contains("ATTESTA-ROOT-UP")
}

/// Runs the scene in `dir` with `n` VMs on chips of `root`.
pub async fn run(
    dir: &Path,
    n: usize,
    root: &Arc<Pki>,
    parts: &Parts,
    progress: &dyn Fn(&str),
) -> Result<RealVms, String> {
    let e = |x: &dyn std::fmt::Display| x.to_string();
    std::fs::create_dir_all(dir).map_err(|x| e(&x))?;
    let Stack {
        kbs,
        broker,
        operator,
        allowlist_key,
    } = stack_with(dir, StackOptions::trusting(root, [0; 48])).await?;
    let (vmlinuz, modules) = parts.kernel()?;
    let ovmf = dir.join("ovmf.fd");
    std::fs::write(&ovmf, measure::synthetic_ovmf(262_144, 11)).map_err(|x| e(&x))?;
    let ca = dir.join("kbs-ca.crt");
    std::fs::write(&ca, snp::certs::pem_encode("CERTIFICATE", &broker.ca_der))
        .map_err(|x| e(&x))?;
    let port = broker.addr.port();
    let image = |vm: &str, out: &Path, timeout: u32| -> Result<String, String> {
        let cfg = dir.join(format!("{vm}.toml"));
        std::fs::write(
            &cfg,
            format!(
                "vm_id = \"{vm}\"\n[broker]\naddress = \"10.0.2.2:{port}\"\n\
                 server_name = \"{}\"\nca = \"/etc/attesta/kbs-ca.crt\"\n\
                 response_key = \"{}\"\ntimeout_secs = {timeout}\n\
                 [disk]\npath = \"/dev/vda\"\n[device]\nkind = \"virtio-psp\"\n",
                broker.server_name,
                hex::encode(broker.response_key)
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
    let mut vms = Vec::new();
    for i in 0..n {
        let vm = format!("vm-real-{i}");
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
    for (i, (vm, _, m)) in vms.iter().enumerate() {
        kbs.register(&order(vm, i, &chip.chip_id, m).sign(&operator), now)
            .await
            .map_err(|x| format!("{vm}: {x}"))?;
    }

    let mut r = RealVms::default();
    for (i, (vm, img, m)) in vms.iter().enumerate() {
        let disk = dir.join(format!("{vm}.img"));
        std::fs::File::create(&disk)
            .and_then(|f| f.set_len(64 << 20))
            .map_err(|x| e(&x))?;
        let sock = dir.join(format!("{vm}.psp"));
        // A PSP serves one launch (one QEMU process): each boot starts its own.
        let psp = || Psp::start(root, &chip, &ovmf, img, &sock);
        if psp()?.measurement != *m {
            return Err(format!(
                "{vm}: the PSP measured another image than the manifest states"
            ));
        }
        for (n, expect) in [
            (1, "formatted and unlocked"),
            (2, "unlocked (generation 1, boot 2)"),
        ] {
            progress(&format!("real VMs: {vm} boot {n} (QEMU)"));
            let _psp = psp()?;
            let b = boot(img, &sock, &disk)?;
            r.booted += 1;
            let up = b.status == Some(0)
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
            } else {
                progress("");
                eprintln!("{vm} boot {n} did not come up:\n{}", b.console);
            }
        }
        if i > 0 {
            continue;
        }
        // The host's attacks on the first VM.
        progress(&format!("real VMs: {vm} with a cipher_null header"));
        let tampered = dir.join(format!("{vm}-tampered.img"));
        std::fs::copy(&disk, &tampered).map_err(|x| e(&x))?;
        let meta = std::fs::read(&tampered).map_err(|x| e(&x))?;
        let forged = guest_agent::header::forge_json_edit(&meta, |t| {
            *t = t.replacen("\"aes-xts-plain64\"", "\"cipher_null-ecb\"", 2)
        })?;
        {
            use std::io::Write;
            std::fs::OpenOptions::new()
                .write(true)
                .open(&tampered)
                .and_then(|mut f| f.write_all(&forged))
                .map_err(|x| e(&x))?;
        }
        let b = {
            let _psp = psp()?;
            boot(img, &sock, &tampered)?
        };
        r.booted += 1;
        r.tampered_header_refused = failed_closed(&b, "\"cipher_null-ecb\", not aes-xts-plain64");

        progress(&format!("real VMs: {vm} with a swapped initrd"));
        let swapped = dir.join(format!("{vm}-swapped"));
        image(vm, &swapped, 31)?;
        for f in ["vmlinuz", "cmdline"] {
            std::fs::copy(img.join(f), swapped.join(f)).map_err(|x| e(&x))?;
        }
        let swapped_psp = Psp::start(root, &chip, &ovmf, &swapped, &sock)?;
        let b = boot(&swapped, &sock, &disk)?;
        r.booted += 1;
        r.swapped_initrd_denied =
            swapped_psp.measurement != *m && failed_closed(&b, "measurement_not_allowed");
        drop(swapped_psp);

        progress(&format!("real VMs: {vm} terminated"));
        let mut t = order(vm, i, &chip.chip_id, m);
        t.kind = OrderKind::Terminate;
        kbs.terminate(&t.sign(&operator), crate::demo::now())
            .await
            .map_err(|x| format!("{vm}: terminate: {x}"))?;
        let b = {
            let _psp = psp()?;
            boot(img, &sock, &disk)?
        };
        r.booted += 1;
        r.terminated_failed_closed = failed_closed(&b, "vm_terminated");
    }
    progress("");
    Ok(r)
}
