//! `evidence export`: one VM's evidence bundle for its tenant, who checks it offline with
//! `attesta-verify bundle` (format: [`proto::bundle`]).

use crate::clock::now;
use crate::serve_cmd::{audit_key, build, fail, runtime};
use clap::Subcommand;
use kbs::config::Config;
use kbs::store::Store;
use proto::bundle::{BUNDLE_VERSION, Bundle, STATEMENT_KIND, cut, sha256, statement};
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
        let (record, log) = rt.block_on(async {
            let record = kbs.store.vm(vm).await.map_err(|e| e.to_string())?;
            // Signed now, so the segment reaches the end of the log.
            kbs.store.checkpoint().await.map_err(|e| e.to_string())?;
            let log = kbs.store.audit_log().await.map_err(|e| e.to_string())?;
            Ok::<_, String>((record, log))
        })?;
        let record = record.ok_or_else(|| format!("no VM {vm} in this broker's store"))?;
        let segment = cut(&log, vm).map_err(|e| e.to_string())?;
        let mut bundle = Bundle {
            v: BUNDLE_VERSION,
            vm_id: vm.clone(),
            exported_at: now(),
            order: hex::encode(&record.order),
            audit_key: hex::encode(kbs::audit::public_key(&audit)),
            log: segment,
            signature: String::new(),
        };
        let closing = bundle
            .closing_checkpoint()
            .ok_or("the segment does not end with a checkpoint")?;
        let message = statement(
            vm,
            bundle.exported_at,
            &sha256(&record.order),
            &kbs::audit::public_key(&audit),
            closing,
        );
        bundle.signature = hex::encode(kbs.response_key.sign(STATEMENT_KIND, &message));
        Ok(bundle)
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
