//! `attesta-kbs`: the key broker's command line: verify evidence, run the service, and the
//! operator's tools (orders, allowlists, client certificates, the audit log).
#![forbid(unsafe_code)]

mod admin_cmd;
mod clock;
mod evidence_cmd;
mod init_cmd;
mod mesh_setup;
mod ops_cmd;
mod serve_cmd;
mod verify_cmd;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

#[derive(Parser)]
#[command(name = "attesta-kbs", version, about = "Attesta key broker service", long_about = None)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Verify an SEV-SNP attestation report (authenticity, and with --policy, appraisal).
    ///
    /// Exit status: 0 accepted, 1 rejected (including a malformed report), 2 usage error or
    /// unreadable file.
    VerifyReport(Box<verify_cmd::VerifyArgs>),
    /// Verify every evidence bundle in a directory (one subdirectory each: report.bin, a VCEK
    /// or VLEK, optional ask.pem/ark.pem or cert_chain.pem) and print a table.
    VerifyDir(verify_cmd::VerifyDirArgs),
    /// Write a new configuration with fresh keys and TLS certificates.
    Init(init_cmd::InitArgs),
    /// Run the key broker service.
    Serve(serve_cmd::ServeArgs),
    /// VM records.
    #[command(subcommand)]
    Vm(admin_cmd::VmCmd),
    /// The signed measurement allowlist.
    #[command(subcommand)]
    Allowlist(admin_cmd::AllowlistCmd),
    /// Sign operator orders (register, terminate) with the operator's order key.
    #[command(subcommand)]
    Order(ops_cmd::OrderCmd),
    /// Client certificates for hosts and operators.
    #[command(subcommand)]
    Cert(ops_cmd::CertCmd),
    /// The tamper-evident audit log.
    #[command(subcommand)]
    Audit(AuditCmd),
    /// The key-encryption key.
    #[command(subcommand)]
    Kek(admin_cmd::KekCmd),
    /// A VM's evidence for its tenant, checked offline with `attesta-verify`.
    #[command(subcommand)]
    Evidence(evidence_cmd::EvidenceCmd),
    /// Ask a running VM, through its broker, to attest with a nonce of your own (the tenant's
    /// "attest now"); check the answer with `attesta-verify report`. Exit 0 answered, 1 not.
    Challenge(evidence_cmd::ChallengeArgs),
}

#[derive(Subcommand)]
enum AuditCmd {
    /// Check a log's hash chain and signed checkpoints offline. Exit 0 intact, 1 tampered or
    /// unverifiable, 2 usage error or unreadable file.
    Verify {
        /// The audit log (JSON Lines).
        log: std::path::PathBuf,
        /// The broker's audit public key: 32 bytes raw, or 64 hex digits.
        #[arg(long, value_name = "FILE")]
        key: std::path::PathBuf,
    },
    /// Sign a checkpoint now and write the whole log (JSON Lines) for `audit verify`.
    Export {
        #[arg(long, value_name = "FILE")]
        config: std::path::PathBuf,
        /// Output file (default: standard output).
        #[arg(long, value_name = "FILE")]
        out: Option<std::path::PathBuf>,
    },
}

fn audit_verify(log: &std::path::Path, key: &std::path::Path) -> ExitCode {
    let fail = |m: String| {
        eprintln!("attesta-kbs audit verify: {m}");
        ExitCode::from(2)
    };
    let text = match std::fs::read_to_string(log) {
        Ok(t) => t,
        Err(e) => return fail(format!("cannot read {}: {e}", log.display())),
    };
    let raw = match std::fs::read(key) {
        Ok(k) => k,
        Err(e) => return fail(format!("cannot read {}: {e}", key.display())),
    };
    let pk = if raw.len() == 32 {
        raw
    } else {
        match hex::decode(String::from_utf8_lossy(&raw).trim()) {
            Ok(k) if k.len() == 32 => k,
            _ => {
                return fail(format!(
                    "{}: expected a 32-byte Ed25519 public key (raw or hex)",
                    key.display()
                ));
            }
        }
    };
    match kbs::audit::verify(&text, &pk) {
        Ok(v) => {
            println!(
                "audit log intact: {} entries, {} signed checkpoints, {} entries after the last checkpoint",
                v.entries, v.checkpoints, v.unsigned_tail
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            println!("audit log NOT intact: {e}");
            ExitCode::from(1)
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::VerifyReport(a) => verify_cmd::verify_report(*a),
        Cmd::VerifyDir(a) => verify_cmd::verify_dir(a),
        Cmd::Audit(AuditCmd::Verify { log, key }) => audit_verify(&log, &key),
        Cmd::Audit(AuditCmd::Export { config, out }) => admin_cmd::audit_export(&config, out),
        Cmd::Order(c) => ops_cmd::order_cmd(&c),
        Cmd::Cert(c) => ops_cmd::cert_cmd(&c),
        Cmd::Init(a) => init_cmd::init(&a),
        Cmd::Serve(a) => serve_cmd::serve_cmd(&a),
        Cmd::Vm(c) => admin_cmd::vm_cmd(&c),
        Cmd::Allowlist(admin_cmd::AllowlistCmd::Sign(a)) => ops_cmd::allowlist_sign(&a),
        Cmd::Allowlist(c) => admin_cmd::allowlist_cmd(&c),
        Cmd::Kek(c) => admin_cmd::kek_cmd(&c),
        Cmd::Evidence(c) => evidence_cmd::evidence_cmd(&c),
        Cmd::Challenge(a) => evidence_cmd::challenge_cmd(&a),
    }
}
