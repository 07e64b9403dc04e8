//! `attesta-kbs`: the key broker's command line. Today: verify SEV-SNP evidence.
#![forbid(unsafe_code)]

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
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::VerifyReport(a) => verify_cmd::verify_report(*a),
        Cmd::VerifyDir(a) => verify_cmd::verify_dir(a),
    }
}
