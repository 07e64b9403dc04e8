//! `evidence export`: one VM's evidence bundle for its tenant, who checks it offline with
//! `attesta-verify bundle` (format: [`proto::bundle`]).

use crate::clock::now;
use crate::serve_cmd::{audit_key, build, fail, runtime};
use clap::Subcommand;
use kbs::config::Config;
use proto::bundle::Bundle;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Subcommand)]
pub enum EvidenceCmd {
    /// Write a VM's evidence bundle: its register order, and the audit log from its register
    /// entry to a checkpoint signed now — its own releases and denials whole (each with its
    /// report and VCEK), other VMs' entries elided — signed with the broker's response key.
    /// The tenant checks it with `attesta-verify bundle`.
    Export {
        /// The VM.
        #[arg(long, value_name = "ID")]
        vm: String,
        /// The bundle file to write.
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
        /// The broker's configuration (its store, response key and audit key).
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
    },
}

pub fn evidence_cmd(c: &EvidenceCmd) -> ExitCode {
    let EvidenceCmd::Export { vm, out, config } = c;
    let r = (|| -> Result<Bundle, String> {
        let c = Config::load(config)?;
        let audit = audit_key(&c)?
            .ok_or("no audit_key configured: the log cannot be checkpointed, so nothing a tenant could verify can be exported")?;
        let rt = runtime()?;
        let _g = rt.enter();
        let (kbs, ..) = build(&c)?;
        rt.block_on(kbs.evidence_bundle(vm, &kbs::audit::public_key(&audit), now()))
    })();
    let written = r.and_then(|b| {
        let json = serde_json::to_vec(&b).map_err(|e| e.to_string())?;
        std::fs::write(out, &json).map_err(|e| format!("{}: {e}", out.display()))?;
        Ok(b)
    });
    match written {
        Ok(b) => {
            let own = b
                .log
                .iter()
                .filter(|l| matches!(l, proto::audit::Line::Entry(_)))
                .count();
            eprintln!(
                "attesta-kbs evidence export: {} written: VM {vm}, {own} entries of its own in a segment of {} lines",
                out.display(),
                b.log.len()
            );
            ExitCode::SUCCESS
        }
        Err(e) => fail("evidence export", e),
    }
}
