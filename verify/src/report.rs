//! `attesta-verify report`: the pure check of a running VM's answer to the tenant's own
//! challenge (`attesta-kbs challenge`): a genuine AMD report (AMD's roots, or a chain named
//! explicitly), whose REPORT_DATA binds the tenant's nonce, the VM's mesh key and its id, passing
//! the order's policy (its measurements and chips) and, if given, one of the tenant's
//! measurements. The mesh key is the tenant's to supply (from their own mesh connection to the
//! VM, or the evidence bundle's last release), never taken from the broker's answer: only then
//! does a pass say the report is *this* VM's.

use crate::Finding;
use proto::order::{Order, OrderKind};
use serde_json::{Value, json};
use snp::{CertTable, Evidence, Policy, Revocation, Verifier, VerifierConfig};

/// What the tenant brings.
#[derive(Clone, Debug, Default)]
pub struct ReportExpect<'a> {
    /// The VM's register order (the signed document).
    pub order: &'a [u8],
    /// The nonce the tenant chose for this challenge.
    pub nonce: [u8; 32],
    /// The VM's mesh key (from its certificate, or as the answer names it).
    pub mesh_key: [u8; 32],
    pub measurements: Vec<[u8; 48]>,
    /// The instant to check certificates at.
    pub at: u64,
    /// A non-AMD chain trusted explicitly (ASK or ASVK, then ARK; DER): the simulator's.
    pub trust_chain: Option<(Vec<u8>, Vec<u8>)>,
}

/// What the check found: findings (none: all good) and the report's verdict and fields.
#[derive(Clone, Debug)]
pub struct ReportOutcome {
    pub findings: Vec<Finding>,
    pub report: Value,
}

impl ReportOutcome {
    pub fn ok(&self) -> bool {
        self.findings.is_empty()
    }

    pub fn to_json(&self) -> Value {
        json!({
            "verdict": if self.ok() { "ok" } else { "findings" },
            "findings": self.findings.iter().map(|f| json!({"code": f.code, "detail": f.detail}))
                .collect::<Vec<_>>(),
            "report": self.report,
            "revocation": "not_checked",
        })
    }
}

/// Checks a report and its certificate table (as the VM's host supplied it) for the tenant.
pub fn check_report(report: &[u8], cert_table: &[u8], e: &ReportExpect<'_>) -> ReportOutcome {
    let mut f = Vec::new();
    let (policy, vm_id) = match Order::decode_stored(e.order) {
        Ok(o) if o.kind == OrderKind::Register => (
            Policy::for_vm(&o.policy, &o.measurements, &o.chip_ids),
            o.vm_id,
        ),
        Ok(_) => {
            f.push(Finding::new("order_mismatch", None, "not a register order"));
            (Policy::nothing(), String::new())
        }
        Err(err) => {
            f.push(Finding::new("order_unreadable", None, err.to_string()));
            (Policy::nothing(), String::new())
        }
    };
    let table = CertTable::parse(cert_table).unwrap_or_default();
    let verifier = Verifier::new(VerifierConfig {
        trust_roots: e.trust_chain.iter().map(|(_, ark)| ark.clone()).collect(),
        revocation: Revocation::IfAvailable,
        ..Default::default()
    });
    let ev = Evidence {
        report,
        vcek: table.signing_cert(),
        ask: e.trust_chain.as_ref().map(|(ask, _)| ask.as_slice()),
        ark: e.trust_chain.as_ref().map(|(_, ark)| ark.as_slice()),
        crls: &[],
    };
    let verdict = verifier.verify_with_policy(&ev, &policy, e.at);
    if !verdict.reasons.is_empty() {
        let codes: Vec<&str> = verdict.reasons.iter().map(|r| r.code()).collect();
        f.push(Finding::new("report_rejected", None, codes.join(", ")));
    }
    if let Some(r) = &verdict.report {
        if r.report_data != proto::tenant_report_data(&e.nonce, &e.mesh_key, &vm_id) {
            f.push(Finding::new(
                "report_data_mismatch",
                None,
                "the report does not bind this nonce, mesh key and VM (not this VM's answer to this challenge)",
            ));
        }
        if !e.measurements.is_empty() && !e.measurements.contains(&r.measurement) {
            f.push(Finding::new(
                "measurement_not_expected",
                None,
                format!(
                    "{} is none of the given measurements",
                    hex::encode(r.measurement)
                ),
            ));
        }
    }
    ReportOutcome {
        findings: f,
        report: snp::json::verdict_json(&verdict, &snp::reason::rfc3339(e.at), true),
    }
}
