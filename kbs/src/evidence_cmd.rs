//! The tenant's side of the broker: `evidence export` (one VM's evidence bundle, checked
//! offline with `attesta-verify bundle`; format [`proto::bundle`]) and `challenge` ("attest now
//! with my nonce" for a running VM, checked with `attesta-verify report`).

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

/// `attesta-kbs challenge`: ask a running VM, through its broker, to attest with a nonce of
/// your own.
#[derive(clap::Args)]
pub struct ChallengeArgs {
    /// The running VM.
    #[arg(long, value_name = "ID")]
    pub vm: String,
    /// The broker's UDP address.
    #[arg(long, value_name = "ADDR")]
    pub kbs: std::net::SocketAddr,
    /// The broker's TLS CA (PEM), pinned.
    #[arg(long, value_name = "FILE")]
    pub ca: PathBuf,
    /// The name in the broker's certificate.
    #[arg(long, default_value = "kbs.attesta.local")]
    pub server_name: String,
    /// Your nonce, 64 hex digits (default: 32 random bytes, written to DIR/nonce).
    #[arg(long, value_name = "HEX")]
    pub nonce: Option<String>,
    /// How long to wait for the VM's answer, seconds (it comes with its next lease renewal,
    /// every 15 minutes by default).
    #[arg(long, default_value_t = 1200)]
    pub wait: u64,
    /// Seconds between asks while waiting.
    #[arg(long, default_value_t = 5)]
    pub poll: u64,
    /// Where to write report.bin, cert_table.bin, nonce and mesh_key (the key the VM says it
    /// has; check it against the one you know: `attesta-verify report DIR --nonce ...
    /// --mesh-key ...`).
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
}

pub fn challenge_cmd(a: &ChallengeArgs) -> ExitCode {
    use proto::msg::{Request, Response, VERSION};
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let r = (|| -> Result<String, String> {
        let ca =
            CertificateDer::from_pem_file(&a.ca).map_err(|e| format!("{}: {e}", a.ca.display()))?;
        let nonce: [u8; 32] = match &a.nonce {
            Some(h) => hex::decode(h.trim())
                .ok()
                .and_then(|b| <[u8; 32]>::try_from(b).ok())
                .ok_or("--nonce: expected 64 hex digits")?,
            None => {
                let mut n = [0u8; 32];
                aws_lc_rs::rand::fill(&mut n).map_err(|_| "no randomness")?;
                n
            }
        };
        std::fs::create_dir_all(&a.out).map_err(|e| format!("{}: {e}", a.out.display()))?;
        let rt = runtime()?;
        let req = Request::TenantChallenge {
            v: VERSION,
            vm_id: a.vm.clone(),
            nonce: nonce.to_vec(),
        };
        let start = std::time::Instant::now();
        let mut told = false;
        loop {
            let resp = rt
                .block_on(kbs::client::ask(a.kbs, &a.server_name, ca.clone(), &req))
                .map_err(|e| e.to_string())?;
            match resp {
                Response::Attested {
                    vm_id,
                    nonce: n,
                    report,
                    cert_table,
                    mesh_key,
                    ..
                } if vm_id == a.vm && n == nonce => {
                    let write = |f: &str, b: &[u8]| {
                        std::fs::write(a.out.join(f), b)
                            .map_err(|e| format!("{}: {e}", a.out.join(f).display()))
                    };
                    write("report.bin", &report)?;
                    write("cert_table.bin", &cert_table)?;
                    write("nonce", hex::encode(nonce).as_bytes())?;
                    write("mesh_key", hex::encode(&mesh_key).as_bytes())?;
                    return Ok(hex::encode(nonce));
                }
                Response::Error { code, detail, .. } if code == "busy" => {
                    return Err(format!("busy: {detail}"));
                }
                Response::Error { code, .. } if code == "pending" => {
                    if !told {
                        eprintln!(
                            "attesta-kbs challenge: asked {}; its answer comes with its next lease renewal (waiting up to {} s)",
                            a.vm, a.wait
                        );
                        told = true;
                    }
                }
                Response::Error { code, detail, .. } => return Err(format!("{code}: {detail}")),
                _ => return Err("unexpected answer".into()),
            }
            if start.elapsed().as_secs() >= a.wait {
                return Err(format!("no answer from {} within {} s", a.vm, a.wait));
            }
            std::thread::sleep(std::time::Duration::from_secs(a.poll.max(1)));
        }
    })();
    match r {
        Ok(nonce) => {
            eprintln!(
                "attesta-kbs challenge: {} answered; check it with: attesta-verify report {} --nonce {nonce} --mesh-key KEY --order ORDER",
                a.vm,
                a.out.display()
            );
            ExitCode::SUCCESS
        }
        // Not answered (refused, busy, no answer in time, unreachable): 1; usage problems were
        // reported by clap (2) before this ran.
        Err(e) => {
            eprintln!("attesta-kbs challenge: {e}");
            ExitCode::from(1)
        }
    }
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
