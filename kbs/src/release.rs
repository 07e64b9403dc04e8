//! The release decision, as a pure function: given what the broker knows about a nonce (its nonce
//! book) and a VM (its store), and what the verifier concluded about the evidence, release the
//! VM's secrets or deny — and say which state changes must be committed (durably, atomically)
//! before the answer is sent.
//!
//! Rules: evidence bound to its connection (no nonce) is fresh by construction, and the session
//! admits one per connection; an unknown, expired or spent issued nonce is denied; an issued
//! nonce is spent by its first use, whatever the outcome, so each yields at most one release; a nonce issued for another
//! VM is denied; an unknown or terminated VM is denied; REPORT_DATA must bind the nonce, the guest
//! key and the connection; the evidence must pass the VM's policy; the reported measurement must
//! be in the current signed allowlist (none loaded: nothing is released), so an image the
//! operator withdraws stops releasing at once, also for VMs registered earlier. Each release
//! advances the VM's boot counter.

use proto::order::Allowlist;
use snp::Reason;

/// What the broker holds about a nonce.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NonceState {
    Issued {
        vm_id: String,
        expires_at: u64,
    },
    Spent,
    /// Derived from the connection the evidence came on ([`proto::connection_nonce`]): fresh
    /// by construction, good for no other connection, and one per connection (the session's
    /// budget); nothing to spend, as nothing was kept.
    Bound,
}

/// What the store holds about a VM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmState {
    pub vm_id: String,
    pub generation: u64,
    pub boot_counter: u64,
    pub terminated: bool,
}

/// Why a release was denied (the closed vocabulary of the audit log and metrics).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Denial {
    UnknownNonce,
    ExpiredNonce,
    SpentNonce,
    NonceForAnotherVm,
    UnknownVm,
    Terminated,
    ReportDataMismatch,
    /// The reported measurement is not in the current signed allowlist: withdrawn since the
    /// VM was registered (or never listed), whatever the VM's order allows.
    MeasurementWithdrawn,
    /// No signed allowlist is loaded: deny by default.
    NoAllowlist,
    Evidence(Reason),
}

impl Denial {
    /// Stable code.
    pub fn code(&self) -> &'static str {
        match self {
            Denial::UnknownNonce => "unknown_nonce",
            Denial::ExpiredNonce => "expired_nonce",
            Denial::SpentNonce => "spent_nonce",
            Denial::NonceForAnotherVm => "nonce_for_another_vm",
            Denial::UnknownVm => "unknown_vm",
            Denial::Terminated => "vm_terminated",
            Denial::ReportDataMismatch => "report_data_mismatch",
            Denial::MeasurementWithdrawn => "measurement_withdrawn",
            Denial::NoAllowlist => "no_allowlist",
            Denial::Evidence(r) => r.code(),
        }
    }
}

/// Everything the decision depends on.
#[derive(Clone, Debug)]
pub struct Request<'a> {
    pub now: u64,
    pub vm_id: &'a str,
    pub nonce: Option<&'a NonceState>,
    pub vm: Option<&'a VmState>,
    /// REPORT_DATA the evidence carries, and what it must be (from nonce, guest key, exporter).
    pub report_data: [u8; 64],
    pub expected_report_data: [u8; 64],
    /// The verifier's reasons (authenticity and the VM's appraisal policy); empty = accepted.
    pub evidence: &'a [Reason],
    /// The measurement the report carries (`None` when the report could not be read: then it
    /// is not shown to be allowlisted either).
    pub measurement: Option<&'a [u8; 48]>,
    /// The current signed allowlist; `None` when none is loaded.
    pub allowlist: Option<&'a Allowlist>,
}

/// The outcome, and the state to commit before answering.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    /// `Ok(new VM state)` to release, `Err(reasons)` to deny.
    pub outcome: Result<VmState, Vec<Denial>>,
    /// Whether the nonce must be marked spent (always, if it was a live nonce).
    pub spend_nonce: bool,
}

/// Decides a release request.
pub fn decide(req: &Request<'_>) -> Decision {
    let mut deny = Vec::new();
    let mut spend_nonce = false;
    match req.nonce {
        None => deny.push(Denial::UnknownNonce),
        Some(NonceState::Spent) => deny.push(Denial::SpentNonce),
        Some(NonceState::Issued { vm_id, expires_at }) => {
            spend_nonce = true; // first use, whatever follows: never a second chance
            if req.now > *expires_at {
                deny.push(Denial::ExpiredNonce);
            }
            if vm_id != req.vm_id {
                deny.push(Denial::NonceForAnotherVm);
            }
        }
        Some(NonceState::Bound) => {}
    }
    match req.vm {
        None => deny.push(Denial::UnknownVm),
        Some(v) if v.terminated => deny.push(Denial::Terminated),
        Some(v) if v.vm_id != req.vm_id => deny.push(Denial::UnknownVm),
        Some(_) => {}
    }
    if req.report_data != req.expected_report_data {
        deny.push(Denial::ReportDataMismatch);
    }
    match (req.allowlist, req.measurement) {
        (None, _) => deny.push(Denial::NoAllowlist),
        (Some(a), m) => {
            let listed = m.is_some_and(|m| a.measurements.iter().any(|x| x.as_slice() == m));
            if !listed {
                deny.push(Denial::MeasurementWithdrawn);
            }
        }
    }
    deny.extend(req.evidence.iter().cloned().map(Denial::Evidence));
    let outcome = match (deny.is_empty(), req.vm) {
        (true, Some(v)) => Ok(VmState {
            boot_counter: v.boot_counter + 1,
            ..v.clone()
        }),
        _ => Err(deny),
    };
    Decision {
        outcome,
        spend_nonce,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vm() -> VmState {
        VmState {
            vm_id: "vm-1".into(),
            generation: 3,
            boot_counter: 7,
            terminated: false,
        }
    }

    fn issued() -> NonceState {
        NonceState::Issued {
            vm_id: "vm-1".into(),
            expires_at: 100,
        }
    }

    const IMAGE: [u8; 48] = [0x4d; 48];

    fn allowlist(epoch: u64, images: &[[u8; 48]]) -> Allowlist {
        Allowlist {
            v: proto::order::ORDER_VERSION,
            epoch,
            measurements: images
                .iter()
                .map(|m| serde_bytes::ByteBuf::from(m.to_vec()))
                .collect(),
        }
    }

    static CURRENT: std::sync::LazyLock<Allowlist> =
        std::sync::LazyLock::new(|| allowlist(1, &[[0x11; 48], IMAGE]));

    fn req<'a>(
        nonce: Option<&'a NonceState>,
        vm: Option<&'a VmState>,
        evidence: &'a [Reason],
    ) -> Request<'a> {
        Request {
            now: 50,
            vm_id: "vm-1",
            nonce,
            vm,
            report_data: [1; 64],
            expected_report_data: [1; 64],
            evidence,
            measurement: Some(&IMAGE),
            allowlist: Some(&CURRENT),
        }
    }

    #[test]
    fn a_good_request_releases_and_advances_the_boot_counter() {
        let (n, v) = (issued(), vm());
        let d = decide(&req(Some(&n), Some(&v), &[]));
        assert_eq!(
            d.outcome,
            Ok(VmState {
                boot_counter: 8,
                ..vm()
            })
        );
        assert!(d.spend_nonce);
    }

    #[test]
    fn every_rule_denies_on_its_own() {
        let (n, v) = (issued(), vm());
        let denied = |r: Request<'_>| decide(&r).outcome.unwrap_err();
        assert_eq!(denied(req(None, Some(&v), &[])), vec![Denial::UnknownNonce]);
        assert_eq!(
            denied(req(Some(&NonceState::Spent), Some(&v), &[])),
            vec![Denial::SpentNonce]
        );
        assert_eq!(
            denied(Request {
                now: 101,
                ..req(Some(&n), Some(&v), &[])
            }),
            vec![Denial::ExpiredNonce]
        );
        let other = NonceState::Issued {
            vm_id: "vm-2".into(),
            expires_at: 100,
        };
        assert_eq!(
            denied(req(Some(&other), Some(&v), &[])),
            vec![Denial::NonceForAnotherVm]
        );
        assert_eq!(denied(req(Some(&n), None, &[])), vec![Denial::UnknownVm]);
        let dead = VmState {
            terminated: true,
            ..vm()
        };
        assert_eq!(
            denied(req(Some(&n), Some(&dead), &[])),
            vec![Denial::Terminated]
        );
        assert_eq!(
            denied(Request {
                report_data: [2; 64],
                ..req(Some(&n), Some(&v), &[])
            }),
            vec![Denial::ReportDataMismatch]
        );
        let ev = [Reason::HwidMismatch];
        assert_eq!(
            denied(req(Some(&n), Some(&v), &ev)),
            vec![Denial::Evidence(Reason::HwidMismatch)]
        );
        assert_eq!(
            Denial::Evidence(Reason::HwidMismatch).code(),
            "hwid_mismatch"
        );
    }

    #[test]
    fn the_current_allowlist_governs_every_release() {
        let (n, v) = (issued(), vm());
        let denied = |r: Request<'_>| decide(&r).outcome.unwrap_err();
        // The image was withdrawn after the VM was registered: its next boot is denied.
        let withdrawn = allowlist(2, &[[0x11; 48]]);
        let d = decide(&Request {
            allowlist: Some(&withdrawn),
            ..req(Some(&n), Some(&v), &[])
        });
        assert_eq!(d.outcome, Err(vec![Denial::MeasurementWithdrawn]));
        assert!(d.spend_nonce);
        assert_eq!(Denial::MeasurementWithdrawn.code(), "measurement_withdrawn");
        // An empty allowlist allows nothing.
        let empty = allowlist(3, &[]);
        assert_eq!(
            denied(Request {
                allowlist: Some(&empty),
                ..req(Some(&n), Some(&v), &[])
            }),
            vec![Denial::MeasurementWithdrawn]
        );
        // No allowlist loaded: deny by default.
        assert_eq!(
            denied(Request {
                allowlist: None,
                ..req(Some(&n), Some(&v), &[])
            }),
            vec![Denial::NoAllowlist]
        );
        assert_eq!(Denial::NoAllowlist.code(), "no_allowlist");
        // A report whose measurement is unknown is not shown to be allowlisted.
        let ev = [Reason::ReportSignatureInvalid];
        assert_eq!(
            denied(Request {
                measurement: None,
                ..req(Some(&n), Some(&v), &ev)
            }),
            vec![
                Denial::MeasurementWithdrawn,
                Denial::Evidence(Reason::ReportSignatureInvalid)
            ]
        );
        // Listed again in a later epoch: released again.
        let back = allowlist(4, &[IMAGE]);
        assert!(
            decide(&Request {
                allowlist: Some(&back),
                ..req(Some(&n), Some(&v), &[])
            })
            .outcome
            .is_ok()
        );
    }

    #[test]
    fn a_live_nonce_is_spent_even_when_denied_and_all_reasons_are_listed() {
        let (n, v) = (issued(), vm());
        let ev = [Reason::ReportSignatureInvalid];
        let d = decide(&Request {
            now: 101,
            report_data: [0; 64],
            ..req(Some(&n), Some(&v), &ev)
        });
        assert!(
            d.spend_nonce,
            "a failed attempt must not leave the nonce usable"
        );
        assert_eq!(
            d.outcome.unwrap_err(),
            vec![
                Denial::ExpiredNonce,
                Denial::ReportDataMismatch,
                Denial::Evidence(Reason::ReportSignatureInvalid)
            ]
        );
        // Unknown or spent nonces have nothing to spend.
        assert!(!decide(&req(None, Some(&v), &[])).spend_nonce);
        assert!(!decide(&req(Some(&NonceState::Spent), Some(&v), &[])).spend_nonce);
    }

    #[test]
    fn evidence_bound_to_its_connection_releases_only_on_every_other_rule() {
        let (b, v) = (NonceState::Bound, vm());
        let d = decide(&req(Some(&b), Some(&v), &[]));
        assert_eq!(d.outcome.map(|s| s.boot_counter), Ok(8));
        assert!(!d.spend_nonce, "nothing was kept, so nothing is spent");
        // No expiry to pass, no VM it was issued for; everything else still holds.
        let late = decide(&Request {
            now: u64::MAX,
            ..req(Some(&b), Some(&v), &[])
        });
        assert!(late.outcome.is_ok());
        let denied = |r: Request<'_>| decide(&r).outcome.unwrap_err();
        assert_eq!(
            denied(Request {
                report_data: [2; 64],
                ..req(Some(&b), Some(&v), &[])
            }),
            vec![Denial::ReportDataMismatch]
        );
        assert_eq!(denied(req(Some(&b), None, &[])), vec![Denial::UnknownVm]);
        let ev = [Reason::ReportSignatureInvalid];
        assert_eq!(
            denied(req(Some(&b), Some(&v), &ev)),
            vec![Denial::Evidence(Reason::ReportSignatureInvalid)]
        );
        assert_eq!(
            denied(Request {
                allowlist: None,
                ..req(Some(&b), Some(&v), &[])
            }),
            vec![Denial::NoAllowlist]
        );
    }
}
