//! `attesta-host`: the miner's host agent.
#![forbid(unsafe_code)]

use clap::{Args, Parser, Subcommand};
use host_agent::domain::{SevParams, domain_xml};
use host_agent::spec::VmSpec;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "attesta-host",
    version,
    about = "Provision SEV-SNP VMs with libvirt for Attesta"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// VM specs and their libvirt domains.
    #[command(subcommand)]
    Vm(VmCmd),
    /// The billing outbox: usage records and their submission to the chain.
    #[command(subcommand)]
    Billing(BillingCmd),
    /// Compute the SEV-SNP launch measurement of the artifacts and VM shape about to be
    /// launched (the same digest as `sev-snp-measure --mode snp`); lowercase hex, last line.
    Measure(MeasureArgs),
}

#[derive(Subcommand)]
enum VmCmd {
    /// Check a VM spec and print the domain XML the agent would define for it.
    Xml(XmlArgs),
    /// The launch gate, as a pre-flight: verify the operator-signed register order and measure
    /// what the spec would start; exit 0 and print the digest only if the order allows it.
    Admit(AdmitArgs),
}

#[derive(Args)]
struct AdmitArgs {
    #[arg(long, value_name = "FILE")]
    spec: PathBuf,
    /// The signed register order (as `attesta-kbs order register` writes it).
    #[arg(long, value_name = "FILE")]
    order: PathBuf,
    /// An operator's order-signing public key (hex Ed25519); repeat for several.
    #[arg(long = "operator-key", value_name = "HEX", required = true)]
    operator_keys: Vec<String>,
}

#[derive(Subcommand)]
enum BillingCmd {
    /// Show every usage record: period, account, total, usage hash, state, attempts, last error.
    Status {
        /// The outbox database.
        #[arg(long, value_name = "FILE")]
        outbox: PathBuf,
        /// One JSON array instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Send every unfinished record to the chain once (exactly once per period and account).
    Drain {
        #[arg(long, value_name = "FILE")]
        outbox: PathBuf,
        /// The node's WebSocket RPC, e.g. ws://127.0.0.1:9944.
        #[arg(long, value_name = "URL")]
        chain: String,
        /// A file (mode 0600) holding the billing key's secret URI or phrase; the key must be
        /// used by this outbox only.
        #[arg(long, value_name = "FILE")]
        signer_file: PathBuf,
        /// `Pallet.call` taking (period, account, amount, usage_hash), or
        /// `System.remark_with_event` to record the document itself.
        #[arg(long, default_value = "Marketplace.submit_compute_usage")]
        call: String,
    },
}

#[derive(Args)]
struct XmlArgs {
    /// The VM spec (TOML; see examples/vm.toml).
    #[arg(long, value_name = "FILE")]
    spec: PathBuf,
    /// C-bit position, where it cannot be read from a driver here (default 51: Milan/Genoa/Turin).
    #[arg(long, default_value_t = 51)]
    cbitpos: u32,
    /// Physical address bits SEV takes (default 1).
    #[arg(long, default_value_t = 1)]
    reduced_phys_bits: u32,
}

#[derive(Args)]
struct MeasureArgs {
    /// The OVMF firmware image (must carry SEV metadata).
    #[arg(long, value_name = "F")]
    ovmf: PathBuf,
    /// Kernel for direct boot, measured through OVMF's SEV hashes table.
    #[arg(long, value_name = "K")]
    kernel: Option<PathBuf>,
    /// Initrd for direct boot (requires --kernel).
    #[arg(long, value_name = "I", requires = "kernel")]
    initrd: Option<PathBuf>,
    /// Kernel command line for direct boot (requires --kernel).
    #[arg(long, value_name = "S", requires = "kernel")]
    append: Option<String>,
    /// Number of vCPUs.
    #[arg(long, value_name = "N")]
    vcpus: u32,
    /// vCPU model as QEMU names it (EPYC-Milan, EPYC-Genoa, EPYC-Turin, EPYC-v4, ...).
    #[arg(long, value_name = "T")]
    vcpu_type: String,
    /// SEV features of the VMSAs, hex (default 0x1: SNP active).
    #[arg(long, value_name = "HEX", default_value = "0x1")]
    guest_features: String,
}

fn xml(a: &XmlArgs) -> Result<(), String> {
    let text = std::fs::read_to_string(&a.spec)
        .map_err(|e| format!("cannot read {}: {e}", a.spec.display()))?;
    let c = VmSpec::parse(&text).map_err(|e| format!("{}: {e}", a.spec.display()))?;
    print!(
        "{}",
        domain_xml(
            &c,
            SevParams {
                cbitpos: a.cbitpos,
                reduced_phys_bits: a.reduced_phys_bits,
            }
        )
    );
    Ok(())
}

fn measure(a: &MeasureArgs) -> Result<(), String> {
    let d = simulator::measure::digest_of_files(&simulator::measure::LaunchFiles {
        ovmf: &a.ovmf,
        kernel: a.kernel.as_deref(),
        initrd: a.initrd.as_deref(),
        append: a.append.as_deref(),
        vcpus: a.vcpus,
        vcpu_type: &a.vcpu_type,
        guest_features: simulator::measure::parse_guest_features(&a.guest_features)?,
    })?;
    println!("{}", hex::encode(d));
    Ok(())
}

fn admit(a: &AdmitArgs) -> Result<(), String> {
    let text = std::fs::read_to_string(&a.spec)
        .map_err(|e| format!("cannot read {}: {e}", a.spec.display()))?;
    let c = VmSpec::parse(&text).map_err(|e| format!("{}: {e}", a.spec.display()))?;
    let doc =
        std::fs::read(&a.order).map_err(|e| format!("cannot read {}: {e}", a.order.display()))?;
    let keys = a
        .operator_keys
        .iter()
        .map(|k| {
            hex::decode(k.trim())
                .ok()
                .and_then(|b| <[u8; 32]>::try_from(b.as_slice()).ok())
                .ok_or_else(|| format!("--operator-key {k:?}: expected 64 hex digits"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let ok = host_agent::gate::admit(&c, &doc, &keys, now).map_err(|e| e.to_string())?;
    println!("admitted: {} may launch with measurement", ok.order.vm_id);
    println!("{}", hex::encode(ok.digest));
    Ok(())
}

fn billing(c: &BillingCmd) -> Result<(), String> {
    use host_agent::billing::{CallKind, Outbox, State, Submitter};
    let rt = tokio::runtime::Runtime::new().map_err(|e| e.to_string())?;
    rt.block_on(async {
        match c {
            BillingCmd::Status { outbox, json } => {
                if !outbox.exists() {
                    return Err(format!("no outbox at {}", outbox.display()));
                }
                let o = Outbox::open(outbox).await.map_err(|e| e.to_string())?;
                let records = o.records().await.map_err(|e| e.to_string())?;
                let state = |s: &State| match s {
                    State::Pending => "pending".to_string(),
                    State::Signed { nonce } => format!("signed (nonce {nonce})"),
                    State::Done => "done".into(),
                    State::Failed => "FAILED".into(),
                };
                if *json {
                    let v: Vec<_> = records
                        .iter()
                        .map(|r| {
                            serde_json::json!({
                                "period": r.period, "account": r.account,
                                "total": r.total.to_string(), "usage_hash": hex::encode(r.hash),
                                "state": state(&r.state), "attempts": r.attempts,
                                "last_error": r.last_error, "tx_hash": r.tx_hash,
                            })
                        })
                        .collect();
                    println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
                } else {
                    println!("{:<10} {:<50} {:>20} {:<18} {:>8}  usage hash", "period", "account", "total", "state", "attempts");
                    for r in &records {
                        println!(
                            "{:<10} {:<50} {:>20} {:<18} {:>8}  {}{}",
                            r.period,
                            r.account,
                            r.total,
                            state(&r.state),
                            r.attempts,
                            hex::encode(r.hash),
                            r.last_error.as_deref().map(|e| format!("\n           last error: {e}")).unwrap_or_default()
                        );
                    }
                    println!("{} records", records.len());
                }
                Ok(())
            }
            BillingCmd::Drain {
                outbox,
                chain,
                signer_file,
                call,
            } => {
                let secret = std::fs::read_to_string(signer_file)
                    .map_err(|e| format!("signer file {}: {e}", signer_file.display()))?;
                let kind = match call.split_once('.') {
                    Some(("System", "remark_with_event")) => CallKind::Remark,
                    Some((pallet, call)) if !pallet.is_empty() && !call.is_empty() => CallKind::Usage {
                        pallet: pallet.into(),
                        call: call.into(),
                    },
                    _ => return Err(format!("--call {call:?}: expected Pallet.call")),
                };
                let o = Outbox::open(outbox).await.map_err(|e| e.to_string())?;
                let s = Submitter::connect(chain, secret.trim(), kind)
                    .await
                    .map_err(|e| e.to_string())?;
                let d = s.drain(&o).await.map_err(|e| e.to_string())?;
                println!(
                    "submitted {}, confirmed already on chain {}, failed at dispatch {}, deferred {}",
                    d.submitted, d.confirmed, d.failed, d.deferred
                );
                if d.failed > 0 || d.deferred > 0 {
                    return Err("some records did not reach the chain (see billing status)".into());
                }
                Ok(())
            }
        }
    })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let r = match &cli.cmd {
        Cmd::Vm(VmCmd::Xml(a)) => xml(a),
        Cmd::Vm(VmCmd::Admit(a)) => admit(a),
        Cmd::Measure(a) => measure(a),
        Cmd::Billing(c) => billing(c),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("attesta-host: {e}");
            ExitCode::from(2)
        }
    }
}
