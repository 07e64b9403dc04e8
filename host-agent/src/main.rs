//! `attesta-host`: the miner's host agent.
#![forbid(unsafe_code)]

mod backup_cmd;
mod chain_cmd;

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
    /// Run the agent: control socket, lifecycle polling, hourly usage, credit check, billing.
    Serve {
        /// The agent's configuration (see examples/host.toml).
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
        /// Log lines as JSON.
        #[arg(long)]
        log_json: bool,
    },
    /// VM specs and their libvirt domains; lifecycle through the running agent.
    #[command(subcommand)]
    Vm(VmCmd),
    /// This host's chip id and TCB, for the operator placing VMs (orders name chip ids).
    Platform {
        /// Read the platform source from this configuration (default: /dev/sev).
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// The billing outbox: usage records and their submission to the chain.
    #[command(subcommand)]
    Billing(BillingCmd),
    /// VM tasks from the chain and what goes back to it (answers, lifecycle records).
    #[command(subcommand)]
    Chain(ChainCmd),
    /// Back a VM's disk (LUKS2 ciphertext) up to the `[backup]` S3 bucket: only the chunks
    /// changed since its last backup; resumes an interrupted one. `--list` shows its backups.
    Backup(backup_cmd::BackupArgs),
    /// Create a VM on this host from its backup (any miner's, same bucket): the launch gate,
    /// chip and capacity as for a create; every chunk's hash is checked first.
    Restore(backup_cmd::RestoreArgs),
    /// Compute the SEV-SNP launch measurement of the artifacts and VM shape about to be
    /// launched (the same digest as `sev-snp-measure --mode snp`); lowercase hex, last line.
    Measure(MeasureArgs),
}

#[derive(Subcommand)]
enum ChainCmd {
    /// The last finalized block processed, each assignment's outcome, lifecycle transitions
    /// not yet batched, and the answers and lifecycle batches still on their way.
    Status {
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum VmCmd {
    /// Check a VM spec and print the domain XML the agent would define for it.
    Xml(XmlArgs),
    /// The launch gate, as a pre-flight: verify the operator-signed register order and measure
    /// what the spec would start; exit 0 and print the digest only if the order allows it.
    Admit(AdmitArgs),
    /// Admit a VM (launch gate), register it with the broker and define it; `--start` boots it.
    Create {
        #[arg(long, value_name = "FILE")]
        spec: PathBuf,
        /// The operator-signed register order.
        #[arg(long, value_name = "FILE")]
        order: PathBuf,
        #[arg(long)]
        start: bool,
        #[command(flatten)]
        agent: AgentArgs,
    },
    /// Start a stopped VM (the launch gate runs again first).
    Start {
        vm_id: String,
        #[command(flatten)]
        agent: AgentArgs,
    },
    /// Shut a VM down (destroyed after the configured grace period).
    Stop {
        vm_id: String,
        #[command(flatten)]
        agent: AgentArgs,
    },
    Reboot {
        vm_id: String,
        #[command(flatten)]
        agent: AgentArgs,
    },
    /// On an operator-signed terminate order: the broker shreds the key, then the domain is
    /// destroyed and undefined and its disk wiped.
    Terminate {
        vm_id: String,
        #[arg(long, value_name = "FILE")]
        order: PathBuf,
        #[command(flatten)]
        agent: AgentArgs,
    },
    /// The agent's VMs and their state.
    List {
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        agent: AgentArgs,
    },
}

/// How to reach the running agent.
#[derive(Args)]
struct AgentArgs {
    /// The agent's control socket.
    #[arg(long, value_name = "PATH", conflicts_with = "config")]
    socket: Option<PathBuf>,
    /// Take the socket from the agent's configuration.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
}

impl AgentArgs {
    fn socket(&self) -> Result<PathBuf, String> {
        match (&self.socket, &self.config) {
            (Some(s), _) => Ok(s.clone()),
            (None, Some(c)) => Ok(host_agent::config::HostConfig::load(c)
                .map_err(|e| e.to_string())?
                .control_socket),
            (None, None) => Ok(PathBuf::from("/run/attesta-host/control.sock")),
        }
    }
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
    /// Measure as a host in `[snp] mode = "simulated"` does: a firmware without an SEV hashes
    /// table (Debian's OVMF) as if it had one. Never what SNP hardware measures.
    #[arg(long)]
    simulated: bool,
}

#[derive(Subcommand)]
enum BillingCmd {
    /// Show every usage record: period, account, total, usage hash, state, attempts, last error.
    Status {
        /// The outbox database.
        #[arg(long, value_name = "FILE", required_unless_present = "config")]
        outbox: Option<PathBuf>,
        /// Take the outbox from the agent's configuration.
        #[arg(long, value_name = "FILE", conflicts_with = "outbox")]
        config: Option<PathBuf>,
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

fn admit(a: &AdmitArgs) -> Result<(), String> {
    let text = std::fs::read_to_string(&a.spec)
        .map_err(|e| format!("cannot read {}: {e}", a.spec.display()))?;
    let c = VmSpec::parse(&text).map_err(|e| format!("{}: {e}", a.spec.display()))?;
    let doc =
        std::fs::read(&a.order).map_err(|e| format!("cannot read {}: {e}", a.order.display()))?;
    let keys = host_agent::config::parse_operator_keys(&a.operator_keys)
        .map_err(|e| format!("--operator-key {e}"))?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let firmware = if a.simulated {
        measure::Firmware::AssumeHashesTable
    } else {
        measure::Firmware::AsBuilt
    };
    let ok =
        host_agent::gate::admit_with(&c, &doc, &keys, now, firmware).map_err(|e| e.to_string())?;
    if a.simulated {
        eprintln!(
            "attesta-host vm admit: SIMULATED measurement (firmware hashes table assumed): never allow it for SEV-SNP hardware"
        );
    }
    println!("admitted: {} may launch with measurement", ok.order.vm_id);
    println!("{}", hex::encode(ok.digest));
    Ok(())
}

fn billing(c: &BillingCmd) -> Result<(), String> {
    use host_agent::billing::{CallKind, Outbox, State, Submitter};
    let rt = tokio::runtime::Runtime::new().map_err(|e| e.to_string())?;
    rt.block_on(async {
        match c {
            BillingCmd::Status {
                outbox,
                config,
                json,
            } => {
                let outbox = match (outbox, config) {
                    (Some(o), _) => o.clone(),
                    (None, Some(c)) => host_agent::config::HostConfig::load(c)
                        .map_err(|e| e.to_string())?
                        .outbox(),
                    (None, None) => return Err("--outbox or --config is required".into()),
                };
                let outbox = &outbox;
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
                                "signed_at_block": r.birth,
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
                let kind = CallKind::parse(call).map_err(|e| format!("--call {e}"))?;
                let o = Outbox::open(outbox).await.map_err(|e| e.to_string())?;
                let s = Submitter::connect(chain, secret.trim(), kind)
                    .await
                    .map_err(|e| e.to_string())?;
                let d = s.drain(&o).await.map_err(|e| e.to_string())?;
                println!(
                    "submitted {}, confirmed already on chain {}, failed at dispatch {}, deferred {}, signed again {}",
                    d.submitted, d.confirmed, d.failed, d.deferred, d.resigned
                );
                if d.failed > 0 || d.deferred > 0 {
                    return Err("some records did not reach the chain (see billing status)".into());
                }
                Ok(())
            }
        }
    })
}

fn serve(config: &std::path::Path, json: bool) -> Result<(), String> {
    let c = host_agent::config::HostConfig::load(config).map_err(|e| e.to_string())?;
    let filter = tracing_subscriber::EnvFilter::try_from_env("ATTESTA_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        b.json().init();
    } else {
        b.init();
    }
    let rt = tokio::runtime::Runtime::new().map_err(|e| e.to_string())?;
    rt.block_on(async {
        let d = host_agent::daemon::Daemon::open(c, host_agent::daemon::system_clock()).await?;
        d.serve().await
    })
}

fn file_b64(p: &std::path::Path) -> Result<String, String> {
    use base64::Engine as _;
    let b = std::fs::read(p).map_err(|e| format!("cannot read {}: {e}", p.display()))?;
    Ok(base64::engine::general_purpose::STANDARD.encode(b))
}

fn vm_op(c: &VmCmd) -> Result<(), String> {
    use host_agent::control::{ControlRequest as R, call};
    let (agent, req, json) = match c {
        VmCmd::Create {
            spec,
            order,
            start,
            agent,
        } => (
            agent,
            R::Create {
                spec: std::fs::read_to_string(spec)
                    .map_err(|e| format!("cannot read {}: {e}", spec.display()))?,
                order: file_b64(order)?,
                start: *start,
            },
            false,
        ),
        VmCmd::Start { vm_id, agent } => (
            agent,
            R::Start {
                vm_id: vm_id.clone(),
            },
            false,
        ),
        VmCmd::Stop { vm_id, agent } => (
            agent,
            R::Stop {
                vm_id: vm_id.clone(),
            },
            false,
        ),
        VmCmd::Reboot { vm_id, agent } => (
            agent,
            R::Reboot {
                vm_id: vm_id.clone(),
            },
            false,
        ),
        VmCmd::Terminate {
            vm_id,
            order,
            agent,
        } => (
            agent,
            R::Terminate {
                vm_id: vm_id.clone(),
                order: file_b64(order)?,
            },
            false,
        ),
        VmCmd::List { json, agent } => (agent, R::List, *json),
        VmCmd::Xml(_) | VmCmd::Admit(_) => return Err("not an agent operation".into()),
    };
    let v = call(&agent.socket()?, &req)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
        return Ok(());
    }
    match (&req, v.as_array()) {
        (R::List, Some(rows)) => {
            println!(
                "{:<24} {:<10} {:<8} {:<24} {:>12}  note",
                "vm", "state", "managed", "account", "rate/hour"
            );
            for r in rows {
                let s = |k: &str| r.get(k).and_then(|v| v.as_str()).unwrap_or("-").to_string();
                println!(
                    "{:<24} {:<10} {:<8} {:<24} {:>12}  {}",
                    s("vm_id"),
                    s("state"),
                    r.get("managed").and_then(|v| v.as_bool()).unwrap_or(false),
                    s("account"),
                    r.get("rate_per_hour")
                        .and_then(|v| v.as_u64())
                        .map(|v| v.to_string())
                        .unwrap_or("-".into()),
                    r.get("stop_reason").and_then(|v| v.as_str()).unwrap_or("")
                );
            }
        }
        _ => {
            let s = |k: &str| v.get(k).and_then(|v| v.as_str()).map(str::to_string);
            println!(
                "{}: {}{}{}",
                s("vm_id").unwrap_or_default(),
                s("state").unwrap_or_default(),
                s("measurement")
                    .map(|m| format!(" (measurement {m})"))
                    .unwrap_or_default(),
                s("broker").map(|b| format!("; {b}")).unwrap_or_default()
            );
            if let Some(b) = s("backups") {
                println!("backups: {b}");
            }
        }
    }
    Ok(())
}

fn platform(config: Option<&std::path::Path>, json: bool) -> Result<(), String> {
    let source = match config {
        Some(c) => {
            host_agent::config::HostConfig::load(c)
                .map_err(|e| e.to_string())?
                .platform
        }
        None => host_agent::config::PlatformConfig::Sev,
    };
    let p = host_agent::platform::read(&source)?;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&p.to_json()).unwrap_or_default()
        );
    } else {
        println!("product       {}", p.product);
        println!(
            "reported TCB  {} (raw {:016x})",
            p.reported_tcb,
            p.reported_tcb.encode(p.product)
        );
        println!(
            "current TCB   {} (raw {:016x})",
            p.current_tcb,
            p.current_tcb.encode(p.product)
        );
        println!("source        {}", p.source);
        println!("chip id (for `attesta-kbs order register --chip-id`):");
        println!("{}", hex::encode(&p.chip_id));
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let r = match &cli.cmd {
        Cmd::Serve { config, log_json } => serve(config, *log_json),
        Cmd::Platform { config, json } => platform(config.as_deref(), *json),
        Cmd::Vm(VmCmd::Xml(a)) => xml(a),
        Cmd::Vm(VmCmd::Admit(a)) => admit(a),
        Cmd::Vm(c) => vm_op(c),
        Cmd::Measure(a) => measure(a),
        Cmd::Backup(a) => backup_cmd::backup(a),
        Cmd::Restore(a) => backup_cmd::restore(a),
        Cmd::Billing(c) => billing(c),
        Cmd::Chain(ChainCmd::Status { config, json }) => chain_cmd::status(config, *json),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("attesta-host: {e}");
            ExitCode::from(2)
        }
    }
}
