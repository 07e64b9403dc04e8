//! `attesta-sim`: the simulated SEV-SNP platform on the command line.
#![forbid(unsafe_code)]

mod demo;
mod disk_attacks;
mod fleet_mesh;
mod flood;
mod floor_bypass;
mod load;
mod load_procs;
mod psp_cmd;
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
    Demo(demo::DemoArgs),
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
    /// Run the broker as its own process(es), made with its own tools, on this store:
    /// `sqlite` (a file beside it) or a `postgres://` URL (an empty database the broker may
    /// use; its tables are created). Without it the broker runs inside this process on SQLite.
    #[arg(long, value_name = "sqlite|postgres://…")]
    store: Option<String>,
    /// Broker processes on the store (replicas; more than one needs PostgreSQL). Each guest
    /// knows them all and boots against the one its number picks.
    #[arg(long, value_name = "N", default_value_t = 1, requires = "store",
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=16))]
    replicas: usize,
    /// VMs registered before the storm (at least --vms): the store's size under the storm.
    #[arg(long, value_name = "N", requires = "store")]
    registered: Option<usize>,
    /// The `attesta-kbs` binary (default: beside this one).
    #[arg(long, value_name = "FILE", requires = "store")]
    kbs_bin: Option<PathBuf>,
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
        Cmd::Demo(a) => demo::driver::run(&a),
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
    if let Some(store) = &a.store {
        let r = load_procs::command(a, store, milan, &dir, &place);
        let _ = std::fs::remove_dir_all(&dir);
        return r;
    }
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
            "store": "sqlite", "replicas": 1, "broker": "in-process",
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
