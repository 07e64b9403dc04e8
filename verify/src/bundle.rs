//! `attesta-verify bundle`: the pure check of one evidence bundle (see the crate docs).

use crate::Finding;
use proto::audit::{AuditError, Entry, Line, verify_segment};
use proto::bundle::{Bundle, STATEMENT_KIND, sha256, statement};
use proto::order::{Order, OrderKind};
use serde_json::{Value, json};
use snp::{Evidence, Policy, Revocation, Verifier, VerifierConfig};

/// What the tenant brings: everything the bundle is judged against.
#[derive(Clone, Debug, Default)]
pub struct Expect<'a> {
    /// The VM's register order, the signed document as the tenant was given it.
    pub order: &'a [u8],
    /// The broker's response public key (Ed25519) the tenant pinned.
    pub broker_key: [u8; 32],
    /// The audit public key, when the tenant holds it; otherwise the one the broker's signed
    /// statement names.
    pub audit_key: Option<[u8; 32]>,
    /// Measurements the tenant computed; empty: the order's alone.
    pub measurements: Vec<[u8; 48]>,
    /// The instant to check certificates at; `None`: each release's own time.
    pub at: Option<u64>,
    /// A chain that is not AMD's (ASK or ASVK, then ARK; DER), trusted only because it is named
    /// here: the simulator's. AMD's roots are always trusted.
    pub trust_chain: Option<(Vec<u8>, Vec<u8>)>,
}

/// One release of the VM's key, as the bundle shows it.
#[derive(Clone, Debug)]
pub struct Release {
    pub seq: u64,
    pub time: u64,
    pub boot_counter: Option<u64>,
    /// Whether this release passed every check.
    pub ok: bool,
    /// The report's verdict and fields (`snp::json::verdict_json`).
    pub report: Value,
}

/// One denial for the VM.
#[derive(Clone, Debug)]
pub struct Denial {
    pub seq: u64,
    pub time: u64,
    pub reasons: Vec<String>,
}

/// What the check found.
#[derive(Clone, Debug, Default)]
pub struct Outcome {
    pub vm_id: String,
    pub findings: Vec<Finding>,
    pub releases: Vec<Release>,
    pub denials: Vec<Denial>,
    /// Entries in the audit segment, and the closing checkpoint's sequence number.
    pub entries: u64,
    pub checkpoint_seq: Option<u64>,
    /// Whether every release's chain ends in AMD's own root (false with a named trust chain).
    pub amd_rooted: bool,
    /// When the broker exported the bundle (signed): nothing after it is shown.
    pub exported_at: u64,
    /// Lease renewals, refusals and revocations of the running VM (no key released by any).
    pub lease_events: u64,
}

impl Outcome {
    /// Nothing found: every release went to a genuine, allowed report and the log is intact.
    pub fn ok(&self) -> bool {
        self.findings.is_empty()
    }

    pub fn to_json(&self) -> Value {
        json!({
            "vm_id": self.vm_id,
            "verdict": if self.ok() { "ok" } else { "findings" },
            "findings": self.findings.iter().map(|f| json!({
                "code": f.code, "seq": f.seq, "detail": f.detail})).collect::<Vec<_>>(),
            "releases": self.releases.iter().map(|r| json!({
                "seq": r.seq, "time": snp::reason::rfc3339(r.time), "boot_counter": r.boot_counter,
                "ok": r.ok, "report": r.report})).collect::<Vec<_>>(),
            "denials": self.denials.iter().map(|d| json!({
                "seq": d.seq, "time": snp::reason::rfc3339(d.time), "reasons": d.reasons}))
                .collect::<Vec<_>>(),
            "audit": {"entries": self.entries, "checkpoint_seq": self.checkpoint_seq},
            "lease_events": self.lease_events,
            "amd_rooted": self.amd_rooted,
            "exported_at": snp::reason::rfc3339(self.exported_at),
            "revocation": "not_checked",
        })
    }
}

/// Checks a bundle (its bytes as read) against what the tenant expects.
pub fn check_bundle(bytes: &[u8], e: &Expect<'_>) -> Outcome {
    let mut out = Outcome::default();
    let b = match Bundle::decode(bytes) {
        Ok(b) => b,
        Err(err) => {
            out.findings
                .push(Finding::new("bundle_malformed", None, err.to_string()));
            return out;
        }
    };
    out.vm_id = b.vm_id.clone();
    let f = &mut out.findings;
    let order_hash = sha256(e.order);
    let order = check_order(&b, e.order, f);
    let audit_key = check_statement(&b, e, f);
    // The audit segment, with the key the tenant named or the broker's statement did.
    let segment = verify_segment(&b.log, &audit_key);
    match &segment {
        Ok(v) => {
            out.entries = v.entries;
            out.checkpoint_seq = v.last_checkpoint.as_ref().map(|c| c.seq);
            if v.unsigned_tail != 0 || v.last_checkpoint.as_ref() != b.closing_checkpoint() {
                f.push(Finding::new(
                    "audit_not_closed",
                    None,
                    format!(
                        "{} entries after the last signed checkpoint",
                        v.unsigned_tail
                    ),
                ));
            }
        }
        Err(err) => f.push(audit_finding(err)),
    }
    match b.log.first() {
        Some(Line::Entry(first)) if first.vm_id == b.vm_id && first.kind == "register" => {
            if first.detail["order_sha256"] != json!(hex::encode(order_hash)) {
                f.push(Finding::new(
                    "order_mismatch",
                    Some(first.seq),
                    "the VM was registered from another order than the one given",
                ));
            }
        }
        _ => f.push(Finding::new(
            "no_register_entry",
            None,
            "the segment does not start at this VM's register entry",
        )),
    }
    // The order's own policy, restricted to its measurements and chips, as the broker applies it.
    let policy = order.as_ref().map_or_else(Policy::nothing, |o| {
        Policy::for_vm(&o.policy, &o.measurements, &o.chip_ids)
    });
    let verifier = Verifier::new(VerifierConfig {
        trust_roots: e.trust_chain.iter().map(|(_, ark)| ark.clone()).collect(),
        revocation: Revocation::IfAvailable,
        ..Default::default()
    });
    let mut terminated = false;
    out.amd_rooted = true;
    for line in &b.log {
        match line {
            Line::Elided { elided } if elided.vm_id == b.vm_id => out.findings.push(Finding::new(
                "vm_entry_elided",
                Some(elided.seq),
                "an entry of this VM is hidden behind its hash",
            )),
            Line::Entry(en) if en.vm_id == b.vm_id => match en.kind.as_str() {
                "release" => {
                    if terminated {
                        out.findings.push(Finding::new(
                            "release_after_terminate",
                            Some(en.seq),
                            "the key was released after the VM was terminated",
                        ));
                    }
                    let r = check_release(en, e, &order_hash, &policy, &verifier, &mut out);
                    out.releases.push(r);
                }
                "denial" => out.denials.push(Denial {
                    seq: en.seq,
                    time: en.time,
                    reasons: en.detail["reasons"]
                        .as_array()
                        .map(|a| {
                            a.iter()
                                .filter_map(|r| r.as_str().map(str::to_string))
                                .collect()
                        })
                        .unwrap_or_default(),
                }),
                "terminate" => terminated = true,
                // A running VM's lease (crate docs): no key is released by it.
                "lease_renewed" | "lease_refused" | "lease_revoked" => out.lease_events += 1,
                "register" if std::ptr::eq(line, &b.log[0]) => {}
                other => out.findings.push(Finding::new(
                    "unknown_entry",
                    Some(en.seq),
                    format!("an entry of this VM of kind {other:?} (a second register, or a kind this verifier does not know)"),
                )),
            },
            _ => {}
        }
    }
    if out.releases.is_empty() {
        out.amd_rooted = false;
    }
    // One report, one release: the same report shown for two releases is a release the report
    // does not account for.
    let mut seen = std::collections::HashSet::new();
    for r in &out.releases {
        let data = &r.report["report_data"];
        if !data.is_null() && !seen.insert(data.to_string()) {
            out.findings.push(Finding::new(
                "report_reused",
                Some(r.seq),
                "this release shows a report an earlier release showed",
            ));
        }
    }
    out.exported_at = b.exported_at;
    out
}

/// The tenant's order: readable, a register order, for this VM, and the one the bundle holds.
fn check_order(b: &Bundle, given: &[u8], f: &mut Vec<Finding>) -> Option<Order> {
    if hex::decode(&b.order).ok().as_deref() != Some(given) {
        f.push(Finding::new(
            "order_mismatch",
            None,
            "the bundle's order is not the order given",
        ));
    }
    match Order::decode_stored(given) {
        Ok(o) if o.kind == OrderKind::Register && o.vm_id == b.vm_id => Some(o),
        Ok(o) => {
            f.push(Finding::new(
                "order_mismatch",
                None,
                format!("the order given is a {:?} order for VM {}", o.kind, o.vm_id),
            ));
            None
        }
        Err(err) => {
            f.push(Finding::new("order_unreadable", None, err.to_string()));
            None
        }
    }
}

/// The broker's signed statement; returns the audit key to check checkpoints with.
fn check_statement(b: &Bundle, e: &Expect<'_>, f: &mut Vec<Finding>) -> [u8; 32] {
    let stated = hex::decode(&b.audit_key)
        .ok()
        .and_then(|k| <[u8; 32]>::try_from(k).ok());
    if let (Some(mine), Some(theirs)) = (e.audit_key, stated)
        && mine != theirs
    {
        f.push(Finding::new(
            "audit_key_mismatch",
            None,
            "the broker's statement names another audit key than the one given",
        ));
    }
    let signed = match (b.closing_checkpoint(), stated, hex::decode(&b.order)) {
        (Some(cp), Some(key), Ok(order)) => {
            let msg = statement(&b.vm_id, b.exported_at, &sha256(&order), &key, cp);
            let sig = hex::decode(&b.signature)
                .ok()
                .and_then(|s| <[u8; 64]>::try_from(s).ok());
            sig.is_some_and(|s| {
                proto::verify_response(&e.broker_key, STATEMENT_KIND, &msg, &s).is_ok()
            })
        }
        _ => false,
    };
    if !signed {
        f.push(Finding::new(
            "broker_signature_invalid",
            None,
            "the bundle's statement is not signed by the broker key given",
        ));
    }
    e.audit_key.or(stated).unwrap_or([0; 32])
}

fn audit_finding(err: &AuditError) -> Finding {
    let (code, seq) = match err {
        AuditError::Hash { seq } => ("audit_entry_changed", Some(*seq)),
        AuditError::Sequence { seq, .. } => ("audit_entry_missing", Some(*seq)),
        AuditError::Chain { seq } => ("audit_chain_broken", Some(*seq)),
        AuditError::Signature { seq }
        | AuditError::CheckpointMismatch { seq }
        | AuditError::Truncated { seq } => ("audit_checkpoint_invalid", Some(*seq)),
        AuditError::NoCheckpoint => ("audit_not_closed", None),
        AuditError::Elided { seq } => ("vm_entry_elided", Some(*seq)),
        AuditError::Malformed { .. } => ("bundle_malformed", None),
    };
    Finding::new(code, seq, err.to_string())
}

fn check_release(
    en: &Entry,
    e: &Expect<'_>,
    order_hash: &[u8; 32],
    policy: &Policy,
    verifier: &Verifier,
    out: &mut Outcome,
) -> Release {
    let before = out.findings.len();
    let mut found = |code: &'static str, detail: String| {
        out.findings.push(Finding::new(code, Some(en.seq), detail))
    };
    let d = &en.detail;
    let bytes = |k: &str| d[k].as_str().and_then(|h| hex::decode(h).ok());
    if d["order_sha256"] != json!(hex::encode(order_hash)) {
        found(
            "order_mismatch",
            "released under another order than the one given".into(),
        );
    }
    let (Some(report), Some(vcek)) = (bytes("report"), bytes("vcek")) else {
        found(
            "release_without_evidence",
            "the entry carries no report or no VCEK".into(),
        );
        out.amd_rooted = false;
        return Release {
            seq: en.seq,
            time: en.time,
            boot_counter: d["boot_counter"].as_u64(),
            ok: false,
            report: Value::Null,
        };
    };
    let ev = Evidence {
        report: &report,
        vcek: Some(&vcek),
        ask: e.trust_chain.as_ref().map(|(ask, _)| ask.as_slice()),
        ark: e.trust_chain.as_ref().map(|(_, ark)| ark.as_slice()),
        crls: &[],
    };
    let at = e.at.unwrap_or(en.time);
    let verdict = verifier.verify_with_policy(&ev, policy, at);
    if !verdict.reasons.is_empty() {
        let codes: Vec<&str> = verdict.reasons.iter().map(|r| r.code()).collect();
        found("release_rejected", codes.join(", "));
    }
    if !verdict.amd_rooted() {
        out.amd_rooted = false;
    }
    match d["policy"].as_str().map(Policy::from_toml) {
        Some(Ok(stated)) => {
            // What the stated policy adds to the order's verdict (authenticity is judged once).
            let v = verifier.verify_with_policy(&ev, &stated, at);
            let extra: Vec<_> = v
                .reasons
                .iter()
                .filter(|r| !verdict.reasons.contains(r))
                .collect();
            if !extra.is_empty() {
                let codes: Vec<&str> = extra.iter().map(|r| r.code()).collect();
                found("stated_policy_not_met", codes.join(", "));
            }
        }
        Some(Err(err)) => found("stated_policy_unreadable", err.to_string()),
        None => found(
            "stated_policy_unreadable",
            "the entry states no policy".into(),
        ),
    }
    if let Some(r) = &verdict.report {
        let expected = (bytes("nonce"), bytes("guest_key"), bytes("exporter"));
        let binds = match expected {
            (Some(n), Some(g), Some(x)) => match (
                <[u8; 32]>::try_from(n.as_slice()),
                <[u8; 32]>::try_from(g.as_slice()),
                <[u8; 32]>::try_from(x.as_slice()),
            ) {
                (Ok(n), Ok(g), Ok(x)) => {
                    let mesh = bytes("mesh_key").unwrap_or_default();
                    // Evidence bound to its connection has that connection's nonce.
                    let fresh = d["bound"] != "connection" || proto::connection_nonce(&x) == n;
                    fresh && proto::expected_report_data(&n, &g, &x, &mesh) == Some(r.report_data)
                }
                _ => false,
            },
            _ => false,
        };
        if !binds {
            found(
                "report_data_mismatch",
                "the report does not bind the nonce, guest key and connection the key was sealed to".into(),
            );
        }
    }
    if let Some(r) = &verdict.report
        && !e.measurements.is_empty()
        && !e.measurements.contains(&r.measurement)
    {
        found(
            "measurement_not_expected",
            format!(
                "{} is none of the given measurements",
                hex::encode(r.measurement)
            ),
        );
    }
    let mut report = snp::json::verdict_json(&verdict, &snp::reason::rfc3339(at), true);
    report["guest_key"] = d["guest_key"].clone();
    Release {
        seq: en.seq,
        time: en.time,
        boot_counter: d["boot_counter"].as_u64(),
        ok: out.findings.len() == before,
        report,
    }
}
