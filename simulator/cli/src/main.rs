//! `attesta-sim`: the simulated SEV-SNP platform on the command line.
#![forbid(unsafe_code)]

mod demo;
mod disk_attacks;
mod fleet_mesh;
mod flood;
mod floor_bypass;
mod load;
mod psp_cmd;
mod real_vms;
mod withdrawal;

use clap::{Args, Parser, Subcommand};
use simulator::der::pem;
use simulator::{Chip, ChipConfig, GuestLaunch, Pki, Seed};
use snp::Product;
use snp::device::GuestDevice;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

#[derive(Parser)]
#[command(
    name = "attesta-sim",
    version,
    about = "A software SEV-SNP: AMD-profile certificates and byte-exact signed reports"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Write a signed attestation report and its certificates (report.bin, vcek.der, ask.pem,
    /// ark.pem, plus cert_chain.pem and certs.bin, the extended report's certificate table).
    ///
    /// The chain ends in the simulator's ARK, never AMD's: verify with
    /// `attesta-kbs verify-report DIR/report.bin --vcek DIR/vcek.der --ask DIR/ask.pem
    /// --ark DIR/ark.pem --trust-root DIR/ark.pem`.
    Report(Box<ReportArgs>),
    /// The whole system on this machine, on the mesh: two lighthouses, a key broker (SQLite,
    /// QUIC on loopback) and host agents with mesh identities, N simulated SEV-SNP VMs with real
    /// LUKS2 images booted twice, attested guests joining the mesh (own tenant reached, others
    /// denied), one terminated and revoked, attacks against the live broker, and a summary.
    Demo(DemoArgs),
    /// A boot storm against a broker on loopback: N VMs at once, releases/s and latency against
    /// the verifier's own rate, and boot-to-unlocked against an argon2id passphrase unlock.
    Load(LoadArgs),
    /// Compute the SEV-SNP launch measurement of a guest from its artifacts, as the AMD firmware
    /// will (the same digest as `sev-snp-measure --mode snp`); printed as hex on the last line.
    Measure(MeasureArgs),
    /// Write a synthetic OVMF image carrying SEV metadata, the SEV hashes table and the SEV-ES
    /// reset block (for cross-checking measurement tools where no such OVMF build is at hand).
    SynthOvmf(SynthArgs),
    /// Run the attack catalogue against the verifier and appraisal policy; exit 1 if any
    /// scenario is not denied for its expected reason.
    Attacks(AttacksArgs),
    /// A simulated PSP for one real VM: measures the files it is launched with and answers its
    /// report requests over a virtio-serial channel (a Unix socket QEMU connects to).
    Psp(Box<psp_cmd::PspArgs>),
}

#[derive(Args)]
struct DemoArgs {
    /// Number of VMs (at least 2: one is terminated, another attacked).
    #[arg(long, default_value_t = 8)]
    vms: usize,
    /// Print one JSON summary object instead of text.
    #[arg(long)]
    json: bool,
    /// Seed of the simulated hierarchies.
    #[arg(long, default_value = "attesta-sim")]
    seed: String,
    /// Where generated key hierarchies are kept between runs (see `report --help`).
    #[arg(long, value_name = "DIR")]
    state: Option<PathBuf>,
    /// Keep the broker's database and the disk images here (default: a temporary directory).
    #[arg(long, value_name = "DIR")]
    dir: Option<PathBuf>,
    /// Also boot this many real VMs (Debian's cloud kernel and OVMF under QEMU, created by a
    /// host agent on qemu:///system with a simulated PSP, an attesta-image initramfs, dm-crypt
    /// in the guest). Default: 1 where QEMU, OVMF, a reachable qemu:///system
    /// (scripts/libvirt-up.sh), the guest kernel (scripts/guest-kernel.sh) and attesta-guest
    /// with the simulator feature are at hand, else 0; 0 skips them.
    #[arg(long, value_name = "N")]
    real_vms: Option<usize>,
    /// In the real VMs, also time an argon2id passphrase unlock of the same disk (cryptsetup's
    /// defaults) right after the agent's unlock: `real_vms.bench` in the JSON.
    #[arg(long)]
    bench_unlock: bool,
}

#[derive(Args)]
struct LoadArgs {
    /// VMs booting at once.
    #[arg(long, default_value_t = 1000)]
    vms: usize,
    /// Simulated chips they are spread over.
    #[arg(long, default_value_t = 20)]
    chips: usize,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
    #[arg(long, default_value = "attesta-sim")]
    seed: String,
    #[arg(long, value_name = "DIR")]
    state: Option<PathBuf>,
    /// CPUs the broker runs on (comma-separated, e.g. `0` or `0,1`); the simulated guests run
    /// on the others, so the load generator does not steal the broker's cores, and the
    /// verifier's own rate is measured on the same CPUs. `shared`: no pinning.
    #[arg(long, value_name = "LIST", default_value = "0")]
    broker_cpus: String,
    /// Connections the broker serves at once (its `max_sessions`); a number larger than
    /// `--vms` admits every boot at once, the behaviour without admission.
    #[arg(long, value_name = "N", default_value_t = kbs::service::DEFAULT_MAX_SESSIONS,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    max_sessions: usize,
}

#[derive(Args)]
struct MeasureArgs {
    /// The OVMF firmware image (must carry SEV metadata).
    #[arg(long, value_name = "FILE")]
    ovmf: PathBuf,
    /// Kernel for direct boot, measured through OVMF's SEV hashes table.
    #[arg(long, value_name = "F")]
    kernel: Option<PathBuf>,
    /// Initrd for direct boot (requires --kernel).
    #[arg(long, value_name = "F", requires = "kernel")]
    initrd: Option<PathBuf>,
    /// Kernel command line for direct boot (requires --kernel).
    #[arg(long, value_name = "STR", requires = "kernel")]
    append: Option<String>,
    /// Number of vCPUs.
    #[arg(long, value_name = "N")]
    vcpus: u32,
    /// vCPU model as QEMU names it (EPYC-Milan, EPYC-Genoa, EPYC-Turin, EPYC-v4, ...).
    #[arg(long, value_name = "TYPE")]
    vcpu_type: String,
    /// SEV features of the VMSAs, hex (default 0x1: SNP active).
    #[arg(long, value_name = "HEX", default_value = "0x1")]
    guest_features: String,
}

#[derive(Args)]
struct SynthArgs {
    /// Image size in bytes (rounded up to 4096).
    #[arg(long, default_value_t = 1 << 20)]
    size: usize,
    /// Varies the image's filler bytes.
    #[arg(long, default_value_t = 0)]
    fill: u8,
    #[arg(long, value_name = "FILE")]
    out: PathBuf,
}

#[derive(Args)]
struct AttacksArgs {
    /// Print `[{"name", "denied", "reason"}]` instead of a table.
    #[arg(long)]
    json: bool,
    /// Seed of the simulated hierarchies.
    #[arg(long, default_value = "attesta-sim")]
    seed: String,
    /// Where generated key hierarchies are kept between runs (see `report --help`).
    #[arg(long, value_name = "DIR")]
    state: Option<PathBuf>,
}

#[derive(Args)]
struct ReportArgs {
    /// Processor generation.
    #[arg(long)]
    product: Product,
    /// Report version (2-5). Default: what the product's current firmware produces (3; Turin 5).
    #[arg(long, value_parser = clap::value_parser!(u32).range(2..=5))]
    version: Option<u32>,
    /// REPORT_DATA, up to 64 bytes of hex (zero-padded on the right).
    #[arg(long, value_name = "HEX64B")]
    report_data: Option<String>,
    /// MEASUREMENT, 48 bytes of hex.
    #[arg(long, value_name = "HEX48B")]
    measurement: Option<String>,
    /// Guest policy, hex (default 0x3001f: ABI 0.31, SMT allowed).
    #[arg(long, value_name = "HEX")]
    policy: Option<String>,
    /// VMPL the report is requested at (0-3).
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u32).range(0..=3))]
    vmpl: u32,
    /// CHIP_ID, hex: 64 bytes, or on Turin 8 (the rest is zero). Default: derived from the seed.
    #[arg(long, value_name = "HEX")]
    chip_id: Option<String>,
    /// HOST_DATA, 32 bytes of hex.
    #[arg(long, value_name = "HEX32B")]
    host_data: Option<String>,
    /// Mask the chip id in the report (MASK_CHIP_ID): the report cannot be bound to a chip.
    #[arg(long)]
    mask_chip_id: bool,
    /// Seed of the simulated key hierarchy and chip: the same seed gives the same keys.
    #[arg(long, default_value = "attesta-sim")]
    seed: String,
    /// Where generated key hierarchies are kept between runs (keys 0600). Default:
    /// $ATTESTA_SIM_STATE, else $XDG_CACHE_HOME/attesta-sim, else ~/.cache/attesta-sim.
    #[arg(long, value_name = "DIR")]
    state: Option<PathBuf>,
    /// Output directory (created if missing).
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let r = match cli.cmd {
        Cmd::Report(a) => report(&a).map(|()| true),
        Cmd::Attacks(a) => attacks(&a),
        Cmd::Measure(a) => measure(&a).map(|()| true),
        Cmd::Demo(a) => run_demo(&a),
        Cmd::Load(a) => run_load(&a),
        Cmd::Psp(a) => psp_cmd::run(&a),
        Cmd::SynthOvmf(a) => std::fs::write(&a.out, measure::synthetic_ovmf(a.size, a.fill))
            .map(|()| true)
            .map_err(|e| format!("cannot write {}: {e}", a.out.display())),
    };
    match r {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("attesta-sim: {e}");
            ExitCode::from(2)
        }
    }
}

/// Parses hex of at most `max` bytes (exactly `max` when `exact`), zero-padding on the right.
fn hex_arg<const N: usize>(name: &str, s: &str, exact: bool) -> Result<[u8; N], String> {
    let t = s.trim();
    let t = t.strip_prefix("0x").unwrap_or(t);
    let v = hex::decode(t).map_err(|e| format!("--{name}: invalid hex: {e}"))?;
    if v.len() > N || (exact && v.len() != N) {
        return Err(format!(
            "--{name}: expected {}{N} bytes, got {}",
            if exact { "" } else { "at most " },
            v.len()
        ));
    }
    let mut out = [0u8; N];
    out[..v.len()].copy_from_slice(&v);
    Ok(out)
}

fn state_dir(arg: &Option<PathBuf>) -> PathBuf {
    arg.clone()
        .unwrap_or_else(simulator::pki::default_state_dir)
}

/// The hierarchy for (product, seed), from the state directory or generated and kept there.
fn pki_for(product: Product, seed: &Seed, state: &Path) -> Result<Pki, String> {
    Pki::cached(product, seed, state, |m| eprintln!("attesta-sim: {m}"))
}

fn run_load(a: &LoadArgs) -> Result<bool, String> {
    if a.vms == 0 {
        return Err("--vms must be at least 1".into());
    }
    let milan = pki_for(
        Product::Milan,
        &Seed::from_text(&a.seed),
        &state_dir(&a.state),
    )?;
    let dir = std::env::temp_dir().join(format!("attesta-load-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let place = if a.broker_cpus == "shared" {
        load::Placement::default()
    } else {
        let cpus = a
            .broker_cpus
            .split(',')
            .map(|c| c.trim().parse::<usize>())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("--broker-cpus {:?}: {e}", a.broker_cpus))?;
        load::Placement::split(cpus)?
    };
    let quiet = a.json;
    let r = load::run(&dir, a.vms, a.chips, milan, &place, a.max_sessions, |m| {
        if !quiet {
            eprintln!("attesta-sim load: {m}");
        }
    });
    let _ = std::fs::remove_dir_all(&dir);
    let r = r?;
    let ratio = r.releases_per_sec / r.verifier_per_sec;
    let argon_ratio = r.argon2id_unlock_ms.map(|a| r.boot_to_unlocked_ms / a);
    if a.json {
        let j = serde_json::json!({
            "vms": r.vms, "chips": r.chips, "released": r.released, "failed": r.failed,
            "broker_cpus": r.broker_cpus, "guest_cpus": r.guest_cpus,
            "max_sessions": a.max_sessions,
            "storm_secs": r.storm_secs,
            "releases_per_sec": r.releases_per_sec,
            "verifier_per_sec": r.verifier_per_sec,
            "handshakes_per_sec": r.handshakes_per_sec,
            "releases_over_handshakes": r.releases_per_sec / r.handshakes_per_sec,
            "releases_over_verifier": ratio,
            "boot_ms": {"p50": r.boot_ms.0, "p99": r.boot_ms.1},
            "release_latency_ms": {"p50": r.release_ms.0, "p99": r.release_ms.1},
            "store_transactions": r.transactions, "store_writes": r.writes,
            "broker_cpu_us": {
                "per_release": r.broker_us_per_release,
                "per_handshake": r.broker_us_per_handshake,
                "per_verification": r.verifier_us_per_report,
                "busy_in_storm": r.broker_busy,
            },
            "boot_to_unlocked_ms": r.boot_to_unlocked_ms,
            "argon2id_unlock_ms": r.argon2id_unlock_ms,
            "unlock_over_argon2id": argon_ratio,
        });
        println!("{}", serde_json::to_string_pretty(&j).unwrap_or_default());
    } else {
        println!(
            "attesta load: {} VMs on {} chips booting at once",
            r.vms, r.chips
        );
        if r.broker_cpus.is_empty() {
            println!("  broker and guests share every CPU");
        } else {
            println!(
                "  broker on CPU {:?}, simulated guests on CPU {:?}",
                r.broker_cpus, r.guest_cpus
            );
        }
        println!(
            "  released {} ({} failed) in {:.2} s: {:.0} releases/s",
            r.released, r.failed, r.storm_secs, r.releases_per_sec
        );
        println!(
            "  verifier alone, broker's CPUs: {:.0} reports/s -> releases at {:.0}% of it",
            r.verifier_per_sec,
            ratio * 100.0
        );
        println!(
            "  QUIC+TLS handshakes alone:   {:.0}/s -> releases at {:.0}% of it",
            r.handshakes_per_sec,
            100.0 * r.releases_per_sec / r.handshakes_per_sec
        );
        println!(
            "  broker CPU: {:.0} us per release ({:.0}% busy in the storm), {:.0} us per handshake alone, {:.0} us per verification",
            r.broker_us_per_release,
            r.broker_busy * 100.0,
            r.broker_us_per_handshake,
            r.verifier_us_per_report
        );
        println!(
            "  evidence round trip (verify, decide, durable commit, seal): p50 {:.1} ms, p99 {:.1} ms",
            r.release_ms.0, r.release_ms.1
        );
        println!(
            "  whole boot (connect, challenge, report, release):           p50 {:.1} ms, p99 {:.1} ms",
            r.boot_ms.0, r.boot_ms.1
        );
        println!(
            "  group commit: {} writes in {} transactions ({:.1} per fsync)",
            r.writes,
            r.transactions,
            r.writes as f64 / r.transactions.max(1) as f64
        );
        match r.argon2id_unlock_ms {
            Some(a) => println!(
                "  boot-to-unlocked {:.1} ms vs argon2id passphrase unlock {:.0} ms: 1/{:.0}",
                r.boot_to_unlocked_ms,
                a,
                a / r.boot_to_unlocked_ms
            ),
            None => println!(
                "  boot-to-unlocked {:.1} ms (cryptsetup CLI unavailable: no argon2id comparison)",
                r.boot_to_unlocked_ms
            ),
        }
    }
    Ok(r.failed == 0)
}

fn run_demo(a: &DemoArgs) -> Result<bool, String> {
    // One VM is terminated and the live attacks aim at another: two at least.
    if a.vms < 2 || a.vms > fleet_mesh::MAX_GUESTS {
        return Err(format!(
            "--vms must be between 2 (one is terminated, another attacked) and {} (the overlay's addresses)",
            fleet_mesh::MAX_GUESTS
        ));
    }
    let seed = Seed::from_text(&a.seed);
    let state = state_dir(&a.state);
    let [m, g, t, r] = demo::seeds(&seed);
    let pkis = [
        pki_for(m.0, &m.1, &state)?,
        pki_for(g.0, &g.1, &state)?,
        pki_for(t.0, &t.1, &state)?,
        pki_for(r.0, &r.1, &state)?,
    ];
    let tmp;
    let dir = match &a.dir {
        Some(d) => {
            std::fs::create_dir_all(d)
                .map_err(|e| format!("cannot create {}: {e}", d.display()))?;
            d.clone()
        }
        None => {
            tmp = std::env::temp_dir().join(format!("attesta-demo-{}", std::process::id()));
            std::fs::create_dir_all(&tmp).map_err(|e| e.to_string())?;
            tmp.clone()
        }
    };
    // The real VMs: asked for (their parts must be here), or 1 where they are.
    let real_parts = match a.real_vms {
        Some(0) => None,
        Some(n) => Some((n, real_vms::Parts::find()?)),
        None => match real_vms::Parts::find() {
            Ok(p) => Some((1, p)),
            Err(why) => {
                eprintln!("attesta-sim demo: no real VMs: {why}");
                None
            }
        },
    };
    if a.bench_unlock && real_parts.is_none() {
        return Err(
            "--bench-unlock times the real VMs' unlocks: there are none (--real-vms 0, or their parts are missing)".into(),
        );
    }
    let milan = Arc::new(pki_for(m.0, &m.1, &state)?);
    let rt = tokio::runtime::Runtime::new().map_err(|e| e.to_string())?;
    // Ctrl-C stops the run and drops everything it holds (the guests' keys on tmpfs included).
    let quiet = a.json;
    let result = rt.block_on(async {
        tokio::select! {
            r = async {
                let s = demo::run(&dir, a.vms, pkis, a.json).await?;
                let r = match &real_parts {
                    Some((n, parts)) => {
                        let note = |m: &str| {
                            if !quiet {
                                eprint!("\r\x1b[2K{m}");
                            }
                        };
                        Some(
                            real_vms::run(
                                &dir.join("real-vms"),
                                *n,
                                &real_vms::Hierarchy {
                                    root: &milan,
                                    seed: &a.seed,
                                    state: &state,
                                },
                                parts,
                                a.bench_unlock,
                                &note,
                            )
                            .await?,
                        )
                    }
                    None => None,
                };
                Ok::<_, String>((s, r))
            } => r,
            _ = tokio::signal::ctrl_c() => Err("interrupted".to_string()),
        }
    });
    if a.dir.is_none() {
        let _ = std::fs::remove_dir_all(&dir);
    }
    let (s, real) = result?;
    let all_denied = s.attacks.iter().all(|x| x.as_expected());
    let mesh_ok = s.mesh.as_expected(s.vms);
    let real_ok = match (&real, &real_parts) {
        (Some(r), Some((n, _))) => r.as_expected(*n, a.bench_unlock),
        _ => true,
    };
    let ok = s.unlocked == s.vms
        && s.domains == s.vms
        && s.denied == 1
        && all_denied
        && mesh_ok
        && real_ok;
    let real_json = real.as_ref().map(|r| {
        serde_json::json!({
            "booted": r.booted,
            "unlocked_in_guest": r.unlocked_in_guest,
            "second_boot_unlocked": r.second_boot_unlocked,
            "terminated_failed_closed": r.terminated_failed_closed,
            "swapped_initrd_denied": r.swapped_initrd_denied,
            "tampered_header_refused": r.tampered_header_refused,
            "boot_to_unlocked_ms": {"p50": r.percentile(50.0), "p99": r.percentile(99.0)},
            "boot_to_init_ms": {"p50": real_vms::pct(&r.boot_to_init_ms, 50.0), "p99": real_vms::pct(&r.boot_to_init_ms, 99.0)},
            "whole_boot_ms": {"p50": real_vms::pct(&r.whole_boot_ms, 50.0), "p99": real_vms::pct(&r.whole_boot_ms, 99.0)},
            "bench": r.bench,
            "ok": real_ok,
        })
    });
    if a.json {
        let attacks: Vec<serde_json::Value> = s
            .attacks
            .iter()
            .map(|x| {
                serde_json::json!({
                    "name": x.name,
                    "denied": x.denied,
                    "reason": x.reason,
                    "expected": x.expected,
                })
            })
            .collect();
        let j = serde_json::json!({
            "vms": s.vms,
            "hosts": s.hosts,
            "domains": s.domains,
            "unlocked": s.unlocked,
            "activated": s.activated,
            "denied": s.denied,
            "attacks": attacks,
            "release_latency_ms": {"p50": s.percentile(50.0), "p99": s.percentile(99.0)},
            "mesh": {
                "lighthouses": s.mesh.lighthouses,
                "hosts": s.mesh.hosts,
                "guests": s.mesh.guests,
                "same_tenant": {"reached": s.mesh.same_tenant.0, "tried": s.mesh.same_tenant.1},
                "cross_tenant": {"denied": s.mesh.cross_tenant.0, "tried": s.mesh.cross_tenant.1},
                "pairs": s.mesh.pairs.iter().map(|(a, b, r)| serde_json::json!({
                    "from": a, "to": b, "outcome": reach_text(r),
                })).collect::<Vec<_>>(),
                "revocation": {
                    "nodes": s.mesh.revoked_known.1,
                    "nodes_revoked": s.mesh.revoked_known.0,
                    "everywhere_ms": s.mesh.revoked_everywhere_ms,
                    "cut_off_expected": s.mesh.cut_off_expected,
                    "cut_off_ms": s.mesh.revoked_cut_off_ms,
                    "reconnect": s.mesh.revoked_reconnect.as_ref().map(reach_text),
                },
                "ok": mesh_ok,
            },
            "real_vms": real_json,
            "ok": ok,
        });
        println!("{}", serde_json::to_string_pretty(&j).unwrap_or_default());
    } else {
        println!(
            "attesta demo: {} simulated SEV-SNP VMs, key broker on the mesh (QUIC on loopback), real LUKS2 images",
            s.vms
        );
        println!(
            "  mesh: {} lighthouses; the broker, {} host agents (role host) and {} guests on it",
            s.mesh.lighthouses, s.mesh.hosts, s.mesh.guests
        );
        println!(
            "  host agents (one per machine, libvirt test driver): {} created {} SEV-SNP domains via signed orders",
            s.hosts, s.domains
        );
        println!(
            "  first boot (format) and second boot (unlock): {} of {} VMs unlocked",
            s.unlocked, s.vms
        );
        if s.activated < s.unlocked {
            println!(
                "    (the key was verified against each LUKS2 header; device-mapper is unavailable here, so {} disks were activated)",
                s.activated
            );
        }
        println!(
            "  terminated VM's next boot denied:             {}",
            if s.denied == 1 { "yes" } else { "NO" }
        );
        println!(
            "  guests' mesh identities (key born in the guest, bound in its report, certified by the broker):"
        );
        println!(
            "    same tenant reached:                        {} of {}",
            s.mesh.same_tenant.0, s.mesh.same_tenant.1
        );
        println!(
            "    other tenant denied by its firewall:        {} of {}",
            s.mesh.cross_tenant.0, s.mesh.cross_tenant.1
        );
        const SHOWN: usize = 12;
        for (a, b, r) in s.mesh.pairs.iter().take(SHOWN) {
            println!("      {a:>8} -> {b:<8} {}", reach_text(r));
        }
        if s.mesh.pairs.len() > SHOWN {
            println!(
                "      … {} more pairs (--json lists them all)",
                s.mesh.pairs.len() - SHOWN
            );
        }
        match s.mesh.revoked_everywhere_ms {
            Some(t) => println!(
                "    terminated vm-0's certificates revoked on all {} nodes (lighthouses, guests, broker) in {t:.0} ms",
                s.mesh.revoked_known.1
            ),
            None => println!(
                "    terminated vm-0's certificates revoked on only {} of {} nodes",
                s.mesh.revoked_known.0, s.mesh.revoked_known.1
            ),
        }
        if s.mesh.cut_off_expected {
            match s.mesh.revoked_cut_off_ms {
                Some(t) => println!("    its live connection to its tenant closed in {t:.0} ms"),
                None => println!("    its live connection to its tenant was NOT closed within 5 s"),
            }
        }
        if let Some(r) = &s.mesh.revoked_reconnect {
            println!("    its next connection: {}", reach_text(r));
        }
        println!(
            "  release latency:                              p50 {:.1} ms, p99 {:.1} ms",
            s.percentile(50.0),
            s.percentile(99.0)
        );
        let n = s.attacks.iter().filter(|x| x.as_expected()).count();
        println!(
            "  attacks against live brokers over QUIC: {n} of {} denied for their reason",
            s.attacks.len()
        );
        for x in &s.attacks {
            println!(
                "    {:<46} {:<8} {}{}",
                x.name,
                if x.denied { "denied" } else { "RELEASED" },
                x.reason,
                if x.as_expected() {
                    String::new()
                } else {
                    format!("  (expected {})", x.expected)
                }
            );
        }
        match &real {
            Some(r) => {
                let yes = |b: bool| if b { "yes" } else { "NO" };
                println!(
                    "  real VMs (host agent on qemu:///system, Debian's cloud kernel, dm-crypt in the guest): {} boots; {} formatted, rooted and unlocked in the guest, {} unlocked again on their second boot; boot to unlocked p50 {:.0} ms",
                    r.booted,
                    r.unlocked_in_guest,
                    r.second_boot_unlocked,
                    r.percentile(50.0).unwrap_or(f64::NAN)
                );
                println!(
                    "    cipher_null header refused in the guest: {}; swapped initrd denied: {}; terminated VM failed closed: {}",
                    yes(r.tampered_header_refused),
                    yes(r.swapped_initrd_denied),
                    yes(r.terminated_failed_closed)
                );
                for b in &r.bench {
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
            None => {
                println!("  real VMs: none (--real-vms 0, or QEMU / the guest kernel not at hand)")
            }
        }
        println!(
            "{}",
            if ok {
                "RESULT: all as expected"
            } else {
                "RESULT: UNEXPECTED OUTCOMES (see above)"
            }
        );
    }
    Ok(ok)
}

fn reach_text(r: &fleet_mesh::Reach) -> String {
    match r {
        fleet_mesh::Reach::Reached => "reached".into(),
        fleet_mesh::Reach::Denied => "denied by its firewall".into(),
        fleet_mesh::Reach::Refused(why) => format!("refused: {why}"),
    }
}

fn measure(a: &MeasureArgs) -> Result<(), String> {
    let d = measure::digest_of_files(&measure::LaunchFiles {
        ovmf: &a.ovmf,
        kernel: a.kernel.as_deref(),
        initrd: a.initrd.as_deref(),
        append: a.append.as_deref(),
        vcpus: a.vcpus,
        vcpu_type: &a.vcpu_type,
        guest_features: measure::parse_guest_features(&a.guest_features)?,
    })?;
    println!("{}", hex::encode(d));
    Ok(())
}

fn attacks(a: &AttacksArgs) -> Result<bool, String> {
    use simulator::attacks::{Lab, catalogue};
    let seed = Seed::from_text(&a.seed);
    let state = state_dir(&a.state);
    let lab = Lab::new(
        pki_for(Product::Milan, &seed, &state)?,
        pki_for(Product::Genoa, &seed, &state)?,
        pki_for(Product::Turin, &seed, &state)?,
        pki_for(Product::Milan, &seed.derive(b"rogue"), &state)?,
    )
    .map_err(|e| e.to_string())?;
    let control = lab.control();
    if !control.is_empty() {
        return Err(format!(
            "the genuine control case was not accepted: {control:?}"
        ));
    }
    let outcomes = lab.run_all();
    let all_ok = outcomes.iter().all(|o| o.denied && o.expected_reason);
    if a.json {
        let v: Vec<serde_json::Value> = outcomes
            .iter()
            .map(|o| serde_json::json!({"name": o.name, "denied": o.denied, "reason": o.reason(), "expected": o.expect, "as_expected": o.denied && o.expected_reason}))
            .collect();
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
    } else {
        let desc: std::collections::HashMap<_, _> = catalogue()
            .iter()
            .map(|s| (s.name, s.description))
            .collect();
        println!("{:<30} {:<8} reason", "attack", "verdict");
        for o in &outcomes {
            let verdict = match (o.denied, o.expected_reason) {
                (true, true) => "denied",
                (true, false) => "DENIED?",
                (false, _) => "ACCEPTED",
            };
            println!("{:<30} {:<8} {}", o.name, verdict, o.reason());
            if !(o.denied && o.expected_reason) {
                println!(
                    "{:<30} {:<8} expected {} ({})",
                    "",
                    "",
                    o.expect,
                    desc.get(o.name).unwrap_or(&"")
                );
            }
        }
        let n = outcomes
            .iter()
            .filter(|o| o.denied && o.expected_reason)
            .count();
        println!(
            "{n} of {} attacks denied for the expected reason (control case accepted)",
            outcomes.len()
        );
    }
    Ok(all_ok)
}

fn report(a: &ReportArgs) -> Result<(), String> {
    let seed = Seed::from_text(&a.seed);
    let pki = Arc::new(pki_for(a.product, &seed, &state_dir(&a.state))?);
    let mut cfg = ChipConfig::typical(&pki, 0);
    if let Some(v) = a.version {
        cfg.report_version = v;
    }
    if let Some(c) = &a.chip_id {
        let id: [u8; 64] = hex_arg("chip-id", c, false)?;
        let n = a.product.hwid_len();
        if id[n..].iter().any(|&b| b != 0) && a.product == Product::Turin {
            return Err(
                "--chip-id: a Turin chip id has 8 significant bytes; the rest must be zero".into(),
            );
        }
        cfg.chip_id = id;
    }
    cfg.mask_chip_id = a.mask_chip_id;
    let chip = Chip::new(pki.clone(), cfg).map_err(|e| e.to_string())?;
    let mut launch = GuestLaunch::default();
    if let Some(m) = &a.measurement {
        launch.measurement = hex_arg("measurement", m, true)?;
    }
    if let Some(h) = &a.host_data {
        launch.host_data = hex_arg("host-data", h, true)?;
    }
    if let Some(p) = &a.policy {
        let t = p.trim();
        launch.policy = u64::from_str_radix(t.strip_prefix("0x").unwrap_or(t), 16)
            .map_err(|e| format!("--policy: {e}"))?;
    }
    let report_data: [u8; 64] = match &a.report_data {
        Some(r) => hex_arg("report-data", r, false)?,
        None => [0; 64],
    };
    let guest = chip.launch(launch);
    let (report, table) = guest
        .get_ext_report(&report_data, a.vmpl)
        .map_err(|e| e.to_string())?;

    std::fs::create_dir_all(&a.out)
        .map_err(|e| format!("cannot create {}: {e}", a.out.display()))?;
    let write = |name: &str, bytes: &[u8]| {
        let p = a.out.join(name);
        std::fs::write(&p, bytes).map_err(|e| format!("cannot write {}: {e}", p.display()))
    };
    write("report.bin", &report)?;
    write("vcek.der", &chip.vcek().cert)?;
    write("ask.pem", pem("CERTIFICATE", &pki.ask.cert).as_bytes())?;
    write("ark.pem", pem("CERTIFICATE", &pki.ark.cert).as_bytes())?;
    write(
        "cert_chain.pem",
        (pem("CERTIFICATE", &pki.ask.cert) + &pem("CERTIFICATE", &pki.ark.cert)).as_bytes(),
    )?;
    write("certs.bin", &table)?;
    let body = snp::AttestationReport::from_bytes(&report).map_err(|e| e.to_string())?;
    println!("product:     {}", a.product);
    println!("version:     {}", body.version);
    println!("chip_id:     {}", hex::encode(body.chip_id));
    println!("measurement: {}", hex::encode(body.measurement));
    println!(
        "wrote:       {}/{{report.bin,vcek.der,ask.pem,ark.pem,cert_chain.pem,certs.bin}}",
        a.out.display()
    );
    println!(
        "simulated:   the chain ends in the simulator's ARK; verifiers accept it only with --trust-root {}/ark.pem",
        a.out.display()
    );
    Ok(())
}
