//! `attesta-verify`: the tenant's offline verifier. Exit status: 0 all good, 1 a finding,
//! 2 usage error or unreadable file.
#![forbid(unsafe_code)]

use attesta_verify::{Expect, Outcome, ReportExpect, check_bundle, check_report};
use clap::{Parser, Subcommand};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "attesta-verify",
    version,
    about = "Check, offline, where a broker released your VM's disk key",
    long_about = "Check, offline and with AMD's built-in roots only, a key broker's evidence bundle \
                  for one VM (`attesta-kbs evidence export`): every release of the VM's key went to \
                  a genuine AMD report with an allowed measurement, on a chip the order allowed, \
                  under the stated policy, and the audit log segment is intact and signed.\n\n\
                  What it cannot show: that a broker whose operator holds its audit key did not \
                  rebuild its log without a release (that needs an anchor outside the broker), \
                  nor anything after the bundle's export time, which it prints.\n\n\
                  Exit status: 0 all good, 1 a finding, 2 usage error or unreadable file."
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Check an evidence bundle.
    Bundle(BundleArgs),
    /// Check a running VM's answer to your own challenge (`attesta-kbs challenge --out DIR`):
    /// a genuine report binding your nonce and the VM's mesh key, that your order allows.
    Report(ReportArgs),
}

#[derive(clap::Args)]
struct ReportArgs {
    /// The folder `attesta-kbs challenge` wrote (report.bin, cert_table.bin).
    dir: PathBuf,
    /// The nonce you chose (64 hex digits): the report must bind it.
    #[arg(long, value_name = "HEX")]
    nonce: String,
    /// Your VM's register order: the signed document you were given.
    #[arg(long, value_name = "ORDER")]
    order: PathBuf,
    /// The VM's mesh key (64 hex digits) as you know it: from your own mesh connection to the
    /// VM (its certificate), or the evidence bundle's last release. Not taken from DIR (the
    /// broker's answer): the report must bind the key you know.
    #[arg(long, value_name = "HEX")]
    mesh_key: String,
    /// A measurement you computed yourself (96 hex digits); repeat for several.
    #[arg(long, value_name = "HEX")]
    measurement: Vec<String>,
    /// Check certificates at this instant (RFC 3339; default now).
    #[arg(long, value_name = "RFC3339")]
    at: Option<String>,
    /// Also trust this non-AMD chain (PEM: ASK or ASVK, then ARK), e.g. the simulator's.
    #[arg(long, value_name = "PEM")]
    trust_chain: Option<PathBuf>,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
struct BundleArgs {
    /// The bundle (`attesta-kbs evidence export --vm ID --out FILE`).
    file: PathBuf,
    /// Your VM's register order: the signed document you were given.
    #[arg(long, value_name = "ORDER")]
    order: PathBuf,
    /// The broker's response public key (Ed25519): 32 bytes raw, or 64 hex digits.
    #[arg(long, value_name = "PUB")]
    broker_key: PathBuf,
    /// The broker's audit public key, when you hold it (default: the one the broker's signed
    /// statement names).
    #[arg(long, value_name = "PUB")]
    audit_key: Option<PathBuf>,
    /// A measurement you computed yourself (96 hex digits); repeat for several. Every release
    /// must be to one of them, on top of the order's.
    #[arg(long, value_name = "HEX")]
    measurement: Vec<String>,
    /// Check certificates at this instant (RFC 3339) instead of each release's own time.
    #[arg(long, value_name = "RFC3339")]
    at: Option<String>,
    /// Also trust this non-AMD chain (PEM: ASK or ASVK, then ARK), e.g. the simulator's. Its
    /// releases are reported as not AMD-rooted.
    #[arg(long, value_name = "PEM")]
    trust_chain: Option<PathBuf>,
    /// Print JSON: the verdict, every finding, every release with its report's fields.
    #[arg(long)]
    json: bool,
}

/// Reads a file of at most [`proto::bundle::MAX_BUNDLE`] bytes (never more into memory).
fn read(p: &Path, what: &str) -> Result<Vec<u8>, String> {
    use std::io::Read;
    let limit = proto::bundle::MAX_BUNDLE as u64;
    let mut out = Vec::new();
    std::fs::File::open(p)
        .and_then(|f| f.take(limit + 1).read_to_end(&mut out))
        .map_err(|e| format!("{what} {}: {e}", p.display()))?;
    if out.len() as u64 > limit {
        return Err(format!("{what} {}: more than {limit} bytes", p.display()));
    }
    Ok(out)
}

/// A string from the bundle, fit for a terminal: control characters escaped, so a crafted
/// bundle cannot hide a finding or draw a line of its own.
fn shown(s: &str) -> String {
    s.chars()
        .flat_map(|c| {
            let esc: Vec<char> = if c.is_control() {
                c.escape_default().collect()
            } else {
                vec![c]
            };
            esc
        })
        .collect()
}

/// A 32-byte public key file: raw, or hex (surrounding whitespace ignored).
fn key(p: &Path, what: &str) -> Result<[u8; 32], String> {
    let b = read(p, what)?;
    let raw = match std::str::from_utf8(&b).map(str::trim) {
        Ok(t) if t.len() == 64 => hex::decode(t).map_err(|e| format!("{what}: {e}"))?,
        _ => b,
    };
    <[u8; 32]>::try_from(raw.as_slice()).map_err(|_| {
        format!(
            "{what} {}: not a 32-byte key (raw or 64 hex digits)",
            p.display()
        )
    })
}

/// 32 bytes from 64 hex digits.
fn hex32(h: &str, what: &str) -> Result<[u8; 32], String> {
    hex::decode(h.trim())
        .ok()
        .and_then(|b| <[u8; 32]>::try_from(b).ok())
        .ok_or_else(|| format!("{what}: expected 64 hex digits"))
}

fn measurements(list: &[String]) -> Result<Vec<[u8; 48]>, String> {
    list.iter()
        .map(|m| {
            hex::decode(m.trim())
                .ok()
                .and_then(|b| <[u8; 48]>::try_from(b).ok())
                .ok_or_else(|| format!("--measurement {m}: not 96 hex digits"))
        })
        .collect()
}

fn instant(at: &Option<String>) -> Result<Option<u64>, String> {
    at.as_deref()
        .map(|t| snp::reason::parse_rfc3339(t).map_err(|e| format!("--at {t}: {e}")))
        .transpose()
}

/// An explicitly trusted non-AMD chain: the ASK (or ASVK) and the ARK, DER.
type Chain = (Vec<u8>, Vec<u8>);

fn trust_chain(p: &Option<PathBuf>) -> Result<Option<Chain>, String> {
    let Some(p) = p else { return Ok(None) };
    let blocks = snp::certs::pem_blocks(&read(p, "--trust-chain")?)
        .map_err(|e| format!("--trust-chain {}: {e}", p.display()))?;
    match <[Vec<u8>; 2]>::try_from(blocks) {
        Ok([ask, ark]) => Ok(Some((ask, ark))),
        Err(_) => Err(format!(
            "--trust-chain {}: expected two certificates (ASK or ASVK, then ARK)",
            p.display()
        )),
    }
}

fn expect_args<'a>(a: &BundleArgs, order: &'a [u8]) -> Result<Expect<'a>, String> {
    Ok(Expect {
        order,
        broker_key: key(&a.broker_key, "--broker-key")?,
        audit_key: a
            .audit_key
            .as_deref()
            .map(|p| key(p, "--audit-key"))
            .transpose()?,
        measurements: measurements(&a.measurement)?,
        at: instant(&a.at)?,
        trust_chain: trust_chain(&a.trust_chain)?,
    })
}

/// `attesta-verify report`: exit 0 good, 1 a finding, 2 usage.
fn report_cmd(a: &ReportArgs) -> ExitCode {
    let run = || -> Result<attesta_verify::ReportOutcome, String> {
        let report = read(&a.dir.join("report.bin"), "report")?;
        let table = read(&a.dir.join("cert_table.bin"), "certificate table")?;
        let order = read(&a.order, "--order")?;
        let mesh_key = hex32(&a.mesh_key, "--mesh-key")?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let e = ReportExpect {
            order: &order,
            nonce: hex32(&a.nonce, "--nonce")?,
            mesh_key,
            measurements: measurements(&a.measurement)?,
            at: instant(&a.at)?.unwrap_or(now),
            trust_chain: trust_chain(&a.trust_chain)?,
        };
        Ok(check_report(&report, &table, &e))
    };
    match run() {
        Ok(o) => {
            if a.json {
                println!("{:#}", o.to_json());
            } else {
                println!(
                    "report: {} (measurement {}, chip {}…)",
                    o.report["verdict"].as_str().unwrap_or("?"),
                    o.report["measurement"].as_str().unwrap_or("?"),
                    o.report["chip_id"]
                        .as_str()
                        .map_or("?", |c| &c[..c.len().min(16)]),
                );
                println!("  revocation: not checked (offline, no CRL)");
                if o.ok() {
                    println!(
                        "OK: a genuine report, bound to your nonce and the VM's mesh key, that your order allows"
                    );
                } else {
                    for f in &o.findings {
                        println!("FINDING {}", shown(&f.to_string()));
                    }
                }
            }
            if o.ok() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Err(e) => {
            eprintln!("attesta-verify report: {e}");
            ExitCode::from(2)
        }
    }
}

fn print_text(o: &Outcome) {
    let rooted = if o.amd_rooted {
        "AMD-rooted"
    } else {
        "NOT AMD-rooted"
    };
    println!(
        "VM {}: {} releases ({rooted}), {} denials, audit segment of {} entries closed by checkpoint {}, exported {}",
        shown(&o.vm_id),
        o.releases.len(),
        o.denials.len(),
        o.entries,
        o.checkpoint_seq
            .map_or_else(|| "none".to_string(), |s| s.to_string()),
        snp::reason::rfc3339(o.exported_at)
    );
    for r in &o.releases {
        println!(
            "  release  entry {:>6}  {}  boot {:<4} measurement {}  chip {}…  {}",
            r.seq,
            snp::reason::rfc3339(r.time),
            r.boot_counter.map_or_else(|| "?".into(), |b| b.to_string()),
            r.report["measurement"].as_str().unwrap_or("?"),
            r.report["chip_id"]
                .as_str()
                .map_or("?", |c| &c[..c.len().min(16)]),
            if r.ok { "ok" } else { "FINDING" }
        );
    }
    for d in &o.denials {
        println!(
            "  denial   entry {:>6}  {}  {}",
            d.seq,
            snp::reason::rfc3339(d.time),
            shown(&d.reasons.join(", "))
        );
    }
    println!("  revocation: not checked (offline, no CRL)");
    println!(
        "  complete up to its export: releases after {} are not shown",
        snp::reason::rfc3339(o.exported_at)
    );
    if o.ok() {
        println!("OK: every release went to a genuine report the order allows; the log is intact");
    } else {
        for f in &o.findings {
            println!("FINDING {}", shown(&f.to_string()));
        }
    }
}

fn main() -> ExitCode {
    let a = match Cli::parse().cmd {
        Cmd::Bundle(a) => a,
        Cmd::Report(r) => return report_cmd(&r),
    };
    let run = || -> Result<Outcome, String> {
        let bundle = read(&a.file, "bundle")?;
        let order = read(&a.order, "--order")?;
        Ok(check_bundle(&bundle, &expect_args(&a, &order)?))
    };
    match run() {
        Ok(o) => {
            if a.json {
                println!("{:#}", o.to_json());
            } else {
                print_text(&o);
            }
            if o.ok() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Err(e) => {
            eprintln!("attesta-verify: {e}");
            ExitCode::from(2)
        }
    }
}
