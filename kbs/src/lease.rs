//! The lease of a running VM. A release that certifies a guest's mesh key starts it; the guest
//! re-attests on a schedule (`attesta-guest keepalive`) with a fresh report bound to its
//! connection and its mesh key, signed with that key; the broker renews the short-lived mesh
//! certificate only then, under the allowlist, the policy floor and the CRLs in force now. A VM
//! that fails is not renewed and drops off the mesh when its certificate ends (mesh nodes close
//! connections whose peer's certificate expired). The holder of the VM's mesh key attesting from
//! another chip or with another image is a clone: its lease is revoked, recorded and counted.
//!
//! The decision is [`decide`], pure; [`Kbs::renew`] gathers its inputs and commits before it
//! answers, as a release does.

use crate::release::VmState;
use crate::service::Kbs;
use crate::store::{Commit, Lease, Store};
use proto::msg::{DenialBody, RenewedBody, Response};
use proto::order::Allowlist;
use snp::Reason;
use std::sync::atomic::Ordering;

/// Why a lease was not renewed (codes shared with the audit log and metrics).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LeaseDenial {
    Terminated,
    /// No release ever certified a mesh key for this VM.
    NoLease,
    /// Revoked earlier; the VM must boot (and be released) again.
    Revoked,
    /// The key is not the one the VM's last release certified: an older instance of the VM
    /// (it booted again since). Not renewed; the current instance's lease is untouched.
    OtherMeshKey,
    /// The VM's mesh key attested from another chip: a clone. Revokes the lease.
    OtherChip,
    /// The VM's mesh key attested with another image: revokes the lease.
    OtherMeasurement,
    ReportDataMismatch,
    MeasurementWithdrawn,
    NoAllowlist,
    Evidence(Reason),
}

impl LeaseDenial {
    pub fn code(&self) -> &'static str {
        match self {
            LeaseDenial::Terminated => "vm_terminated",
            LeaseDenial::NoLease => "no_lease",
            LeaseDenial::Revoked => "lease_revoked",
            LeaseDenial::OtherMeshKey => "lease_other_mesh_key",
            LeaseDenial::OtherChip => "lease_other_chip",
            LeaseDenial::OtherMeasurement => "lease_other_measurement",
            LeaseDenial::ReportDataMismatch => "report_data_mismatch",
            LeaseDenial::MeasurementWithdrawn => "measurement_withdrawn",
            LeaseDenial::NoAllowlist => "no_allowlist",
            LeaseDenial::Evidence(r) => r.code(),
        }
    }

    /// Whether this finding revokes the lease (a clone), rather than only not renewing it.
    pub fn revokes(&self) -> bool {
        matches!(self, LeaseDenial::OtherChip | LeaseDenial::OtherMeasurement)
    }
}

/// Everything a renewal decision depends on. The mesh key's proof of possession is checked
/// before (a request without it decides nothing).
#[derive(Clone, Debug)]
pub struct RenewRequest<'a> {
    pub vm: &'a VmState,
    pub lease: Option<&'a Lease>,
    pub mesh_key: &'a [u8; 32],
    pub report_data: [u8; 64],
    pub expected_report_data: [u8; 64],
    /// The verifier's reasons under the VM's policy now (floor, CRLs); empty = accepted.
    pub evidence: &'a [Reason],
    /// From the report, when it parsed.
    pub measurement: Option<&'a [u8; 48]>,
    pub chip_id: Option<&'a [u8; 64]>,
    pub allowlist: Option<&'a Allowlist>,
}

/// Renew (`Ok`) or not, with every reason. A genuine report (authentic: every evidence reason,
/// if any, is appraisal) from the lease's mesh key on another chip or image revokes, whatever
/// the policy says of that chip or image: only an AMD-signed report counts, and the key's
/// proof of possession was checked before, so no one can revoke a VM's lease with a report
/// they made up or without the VM's key.
pub fn decide(r: &RenewRequest<'_>) -> Result<(), Vec<LeaseDenial>> {
    let mut deny = Vec::new();
    if r.vm.terminated {
        deny.push(LeaseDenial::Terminated);
    }
    match r.lease {
        None => deny.push(LeaseDenial::NoLease),
        Some(l) if l.revoked.is_some() => deny.push(LeaseDenial::Revoked),
        Some(l) if l.mesh_key.as_slice() != r.mesh_key.as_slice() => {
            deny.push(LeaseDenial::OtherMeshKey)
        }
        Some(l) => {
            let genuine = r.measurement.is_some() && r.evidence.iter().all(Reason::is_appraisal);
            if genuine && r.report_data == r.expected_report_data {
                if r.chip_id
                    .is_some_and(|c| c.as_slice() != l.chip_id.as_slice())
                {
                    deny.push(LeaseDenial::OtherChip);
                }
                if r.measurement
                    .is_some_and(|m| m.as_slice() != l.measurement.as_slice())
                {
                    deny.push(LeaseDenial::OtherMeasurement);
                }
            }
        }
    }
    if r.report_data != r.expected_report_data {
        deny.push(LeaseDenial::ReportDataMismatch);
    }
    match (r.allowlist, r.measurement) {
        (None, _) => deny.push(LeaseDenial::NoAllowlist),
        (Some(a), m) => {
            if !m.is_some_and(|m| a.measurements.iter().any(|x| x.as_slice() == m)) {
                deny.push(LeaseDenial::MeasurementWithdrawn);
            }
        }
    }
    deny.extend(r.evidence.iter().cloned().map(LeaseDenial::Evidence));
    if deny.is_empty() { Ok(()) } else { Err(deny) }
}

impl Kbs {
    /// Judges a renewal and answers with a new mesh certificate or a signed denial, committed
    /// first. Requests that cannot be judged (unknown VM, no proof of the mesh key) are refused
    /// before the store is written, as evidence for an unknown VM is.
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn renew(
        &self,
        vm_id: &str,
        report: &[u8],
        cert_table: &[u8],
        mesh_key: &[u8],
        proof: &[u8],
        exporter: [u8; 32],
        now: u64,
    ) -> Response {
        let nonce = proto::connection_nonce(&exporter);
        let refuse = |code: &'static str| {
            self.metrics
                .evidence_refused
                .fetch_add(1, Ordering::Relaxed);
            self.metrics.denied(&[code]);
            Response::denial(
                &self.response_key,
                &DenialBody {
                    vm_id: vm_id.into(),
                    nonce: nonce.to_vec(),
                    reasons: vec![code.into()],
                },
            )
        };
        let Ok(mesh_key) = <[u8; 32]>::try_from(mesh_key) else {
            return Response::error("bad_request", "the mesh key must be 32 bytes");
        };
        let signed = held(&mesh_key, &proto::renew_proof_message(&exporter), proof);
        if !signed {
            return refuse("bad_mesh_key_proof");
        }
        let (record, lease) = match (self.store.vm(vm_id).await, self.store.lease(vm_id).await) {
            (Ok(Some(r)), Ok(l)) => (r, l),
            (Ok(None), _) => return refuse("unknown_vm"),
            _ => return refuse("storage_unavailable"),
        };
        // Only the holder of the VM's current lease key gets a decision (a verification and an
        // audit entry), and not more often than `lease_min_interval`: anyone else, or a VM
        // renewing in a loop, is refused before that.
        match &lease {
            None => return refuse("no_lease"),
            Some(l) if l.revoked.is_some() => return refuse("lease_revoked"),
            Some(l) if l.mesh_key.as_slice() != mesh_key.as_slice() => {
                return refuse("lease_other_mesh_key");
            }
            Some(l) if now < l.renewed_at.saturating_add(self.lease_min_interval) => {
                return refuse("renewed_too_soon");
            }
            Some(_) => {}
        }
        let (order, _, verdict) = self.appraise(Some(&record), report, cert_table, now).await;
        let parsed = verdict.report.as_ref();
        let decision = {
            let allowlist = self.allowlist.read().await;
            decide(&RenewRequest {
                vm: &record.state,
                lease: lease.as_ref(),
                mesh_key: &mesh_key,
                report_data: parsed.map(|r| r.report_data).unwrap_or([0; 64]),
                expected_report_data: proto::renew_report_data(&exporter, &mesh_key),
                evidence: &verdict.reasons,
                measurement: parsed.map(|r| &r.measurement),
                chip_id: parsed.map(|r| &r.chip_id),
                allowlist: allowlist.as_ref(),
            })
        };
        let issued = match (&decision, order.as_ref(), self.guest_issuer.get()) {
            (Ok(()), Some(o), Some(issuer)) => issuer
                .issue(o, &mesh_key, now)
                .map(|der| (der, issuer.chain().to_vec(), issuer.not_after(now)))
                .map_err(|e| {
                    tracing::warn!(vm_id, error = %e, "no mesh certificate for the renewal");
                }),
            _ => Err(()),
        };
        let codes: Vec<&'static str> = match (&decision, &issued) {
            (Err(d), _) => d.iter().map(LeaseDenial::code).collect(),
            (Ok(()), Err(())) => vec!["no_mesh_issuer"],
            (Ok(()), Ok(_)) => Vec::new(),
        };
        let revokes = decision
            .as_ref()
            .err()
            .is_some_and(|d| d.iter().any(LeaseDenial::revokes));
        let lease_update = match (&lease, codes.is_empty(), revokes) {
            (Some(l), true, _) => Some(Lease {
                renewed_at: now,
                ..l.clone()
            }),
            (Some(l), false, true) => Some(Lease {
                revoked: Some(codes.join(",")),
                ..l.clone()
            }),
            _ => None,
        };
        let mut detail = serde_json::json!({"nonce": hex::encode(nonce), "bound": "connection",
            "mesh_key": hex::encode(mesh_key)});
        if let Some(r) = parsed {
            detail["chip_id"] = hex::encode(r.chip_id).into();
            detail["measurement"] = hex::encode(r.measurement).into();
        }
        let kind = match (codes.is_empty(), revokes) {
            (true, _) => "lease_renewed",
            (false, true) => "lease_revoked",
            (false, false) => "lease_refused",
        };
        if !codes.is_empty() {
            detail["reasons"] = serde_json::json!(codes);
        }
        let commit = Commit {
            nonce,
            spend_nonce: false,
            nonce_expires_at: now,
            vm_update: None,
            lease: lease_update,
            // Written only if the lease is still the one judged (see Commit::lease_from).
            lease_from: lease.as_ref().map(|l| l.mesh_key.clone()),
            audit: (now, kind.into(), vm_id.into(), detail),
        };
        let committed = match self.store.commit(&commit).await {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error = %e, "renewal could not be committed; refusing");
                return refuse("storage_unavailable");
            }
        };
        // The lease changed under the decision (a new boot, a revocation, a terminate): the
        // commit recorded a refusal, and that is the answer.
        let (codes, revokes) = match committed.lost_race {
            Some(why) => (vec![why], false),
            None => (codes, revokes),
        };
        match issued {
            Ok((mesh_cert, mesh_chain, not_after)) if codes.is_empty() => {
                self.metrics.lease_renewals.fetch_add(1, Ordering::Relaxed);
                tracing::info!(vm_id, not_after, "lease renewed");
                // Tenants' challenges ride on the renewal to the VM.
                let challenges = self
                    .challenges
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .waiting(vm_id, now)
                    .iter()
                    .map(|n| serde_bytes::ByteBuf::from(n.to_vec()))
                    .collect();
                Response::renewed(
                    &self.response_key,
                    &RenewedBody {
                        vm_id: vm_id.into(),
                        nonce: nonce.to_vec(),
                        mesh_cert,
                        mesh_chain,
                        not_after,
                        challenges,
                    },
                )
            }
            _ => {
                self.metrics.lease_refusals.fetch_add(1, Ordering::Relaxed);
                if revokes {
                    self.metrics
                        .lease_revocations
                        .fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(vm_id, reasons = ?codes, "lease revoked: the VM's mesh key attested elsewhere");
                    // Its certificates are revoked on the mesh now, not when they expire.
                    self.lease_revoked.notify_one();
                } else {
                    tracing::info!(vm_id, reasons = ?codes, "lease not renewed");
                }
                self.metrics.denied(&codes);
                Response::denial(
                    &self.response_key,
                    &DenialBody {
                        vm_id: vm_id.into(),
                        nonce: nonce.to_vec(),
                        reasons: codes.iter().map(|c| c.to_string()).collect(),
                    },
                )
            }
        }
    }
}

/// Whether `proof` is `mesh_key`'s Ed25519 signature over `message` (this connection's
/// exporter under a request's own label): the sender holds the key.
fn held(mesh_key: &[u8; 32], message: &[u8], proof: &[u8]) -> bool {
    aws_lc_rs::signature::UnparsedPublicKey::new(&aws_lc_rs::signature::ED25519, mesh_key)
        .verify(message, proof)
        .is_ok()
}

/// Largest certificate table kept with a challenge's answer (VCEK, ASK, ARK and some).
const MAX_ANSWER_TABLE: usize = 16 * 1024;

impl Kbs {
    /// A tenant's "attest now with my nonce": the VM's answer if it gave one, else the nonce
    /// waits for the VM's next renewal. Only for VMs this broker holds a live lease for.
    pub(crate) async fn tenant_challenge(&self, vm_id: &str, nonce: &[u8], now: u64) -> Response {
        let Ok(nonce) = <[u8; 32]>::try_from(nonce) else {
            return Response::error("bad_request", "the nonce must be 32 bytes");
        };
        let live_key = match self.store.lease(vm_id).await {
            Ok(Some(l)) if l.revoked.is_none() => l.mesh_key,
            Ok(_) => {
                return Response::error(
                    "no_lease",
                    "the VM is not running under a lease of this broker",
                );
            }
            Err(_) => return Response::error("unavailable", "the store cannot be read now"),
        };
        let asked = self
            .challenges
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .ask(vm_id, nonce, now);
        match asked {
            // An answer from an earlier instance of the VM (its lease key changed since) is
            // not this VM's any more.
            crate::challenges::Asked::Answered(a)
                if a.mesh_key.as_slice() != live_key.as_slice() =>
            {
                Response::error(
                    "pending",
                    "answered by an earlier instance of the VM: ask with a new nonce",
                )
            }
            crate::challenges::Asked::Answered(a) => Response::Attested {
                v: proto::msg::VERSION,
                vm_id: vm_id.into(),
                nonce: nonce.to_vec(),
                report: a.report,
                cert_table: a.cert_table,
                mesh_key: a.mesh_key.to_vec(),
            },
            crate::challenges::Asked::Pending => Response::error(
                "pending",
                "passed on to the VM with its next lease renewal: ask again",
            ),
            crate::challenges::Asked::Busy => {
                Response::error("busy", "too many challenges waiting: ask again later")
            }
        }
    }

    /// A running VM's answer to a tenant's challenge, from the holder of its lease's mesh key
    /// (proof over this connection's exporter). Kept for the tenant; the report is judged by the
    /// tenant, not here.
    pub(crate) async fn attest(
        &self,
        vm_id: &str,
        nonce: &[u8],
        (report, cert_table): (Vec<u8>, Vec<u8>),
        (mesh_key, proof): (&[u8], &[u8]),
        exporter: [u8; 32],
        now: u64,
    ) -> Response {
        let (Ok(nonce), Ok(mesh_key)) =
            (<[u8; 32]>::try_from(nonce), <[u8; 32]>::try_from(mesh_key))
        else {
            return Response::error("bad_request", "the nonce and the mesh key must be 32 bytes");
        };
        let signed = held(&mesh_key, &proto::attest_proof_message(&exporter), proof);
        // Only a report that answers this challenge is kept (a report's size, bound to the nonce,
        // the key and the VM), with a certificate table of bounded size: the tenant judges the
        // rest.
        let bound = snp::AttestationReport::from_bytes(&report)
            .is_ok_and(|r| r.report_data == proto::tenant_report_data(&nonce, &mesh_key, vm_id));
        if !bound || cert_table.len() > MAX_ANSWER_TABLE {
            return Response::error(
                "bad_request",
                "not a report answering this challenge, or an oversized certificate table",
            );
        }
        let holder = matches!(
            self.store.lease(vm_id).await,
            Ok(Some(l)) if l.revoked.is_none() && l.mesh_key.as_slice() == mesh_key.as_slice()
        );
        if !signed || !holder {
            return Response::error(
                "forbidden",
                "only the holder of the VM's lease key answers its challenges",
            );
        }
        let answer = crate::challenges::Answer {
            report,
            cert_table,
            mesh_key,
        };
        let kept = self
            .challenges
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .answer(vm_id, nonce, answer, now);
        if kept {
            tracing::info!(vm_id, "a tenant's challenge answered");
            Response::Done {
                v: proto::msg::VERSION,
                vm_id: vm_id.into(),
            }
        } else {
            Response::error("unknown_challenge", "no such challenge waits for this VM")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHIP: [u8; 64] = [0xc1; 64];
    const IMAGE: [u8; 48] = [0x4d; 48];

    fn vm() -> VmState {
        VmState {
            vm_id: "vm-1".into(),
            generation: 1,
            boot_counter: 2,
            terminated: false,
        }
    }

    fn lease() -> Lease {
        Lease {
            vm_id: "vm-1".into(),
            chip_id: CHIP.to_vec(),
            measurement: IMAGE.to_vec(),
            mesh_key: vec![7; 32],
            renewed_at: 10,
            revoked: None,
        }
    }

    fn allowlist() -> Allowlist {
        Allowlist {
            v: 1,
            epoch: 1,
            measurements: vec![serde_bytes::ByteBuf::from(IMAGE.to_vec())],
        }
    }

    fn codes(f: impl FnOnce(&mut RenewRequest<'_>)) -> Vec<&'static str> {
        let (v, l, a) = (vm(), lease(), allowlist());
        let mut r = RenewRequest {
            vm: &v,
            lease: Some(&l),
            mesh_key: &[7; 32],
            report_data: [1; 64],
            expected_report_data: [1; 64],
            evidence: &[],
            measurement: Some(&IMAGE),
            chip_id: Some(&CHIP),
            allowlist: Some(&a),
        };
        f(&mut r);
        match decide(&r) {
            Ok(()) => vec![],
            Err(d) => d.iter().map(LeaseDenial::code).collect(),
        }
    }

    #[test]
    fn a_lease_is_renewed_only_for_its_key_chip_and_image_under_the_current_allowlist() {
        assert_eq!(codes(|_| {}), Vec::<&str>::new());
        let terminated = VmState {
            terminated: true,
            ..vm()
        };
        assert_eq!(
            codes(|r| r.vm = Box::leak(Box::new(terminated))),
            ["vm_terminated"]
        );
        assert_eq!(codes(|r| r.lease = None), ["no_lease"]);
        assert_eq!(codes(|r| r.mesh_key = &[8; 32]), ["lease_other_mesh_key"]);
        assert_eq!(codes(|r| r.report_data = [2; 64]), ["report_data_mismatch"]);
        assert_eq!(codes(|r| r.allowlist = None), ["no_allowlist"]);
        let withdrawn = Allowlist {
            measurements: vec![],
            ..allowlist()
        };
        assert_eq!(
            codes(|r| r.allowlist = Some(Box::leak(Box::new(withdrawn)))),
            ["measurement_withdrawn"]
        );
        let revoked = Lease {
            revoked: Some("lease_other_chip".into()),
            ..lease()
        };
        assert_eq!(
            codes(|r| r.lease = Some(Box::leak(Box::new(revoked)))),
            ["lease_revoked"]
        );
    }

    #[test]
    fn only_a_genuine_report_from_another_chip_or_image_revokes() {
        let other_chip = codes(|r| r.chip_id = Some(&[0xc2; 64]));
        assert_eq!(other_chip, ["lease_other_chip"]);
        assert!(LeaseDenial::OtherChip.revokes() && LeaseDenial::OtherMeasurement.revokes());
        // Another image that is still allowlisted: revoked for the image alone.
        let two = Allowlist {
            measurements: vec![
                serde_bytes::ByteBuf::from(IMAGE.to_vec()),
                serde_bytes::ByteBuf::from(vec![0x11; 48]),
            ],
            ..allowlist()
        };
        assert_eq!(
            codes(|r| {
                r.measurement = Some(&[0x11; 48]);
                r.allowlist = Some(Box::leak(Box::new(two)));
            }),
            ["lease_other_measurement"]
        );
        // Another chip the order does not allow: still genuine, still a clone.
        let c = codes(|r| {
            r.chip_id = Some(&[0xc2; 64]);
            r.evidence = Box::leak(Box::new([Reason::ChipNotAllowed]));
        });
        assert_eq!(c, ["lease_other_chip", "chip_not_allowed"]);
        // A report that does not verify, or does not bind this connection, revokes nothing.
        let bad = [Reason::ReportSignatureInvalid];
        let c = codes(|r| {
            r.chip_id = Some(&[0xc2; 64]);
            r.evidence = Box::leak(Box::new(bad));
        });
        assert_eq!(c, ["report_signature_invalid"]);
        let c = codes(|r| {
            r.chip_id = Some(&[0xc2; 64]);
            r.report_data = [9; 64];
        });
        assert_eq!(c, ["report_data_mismatch"]);
        for d in [
            LeaseDenial::MeasurementWithdrawn,
            LeaseDenial::OtherMeshKey,
            LeaseDenial::Terminated,
        ] {
            assert!(!d.revokes());
        }
    }
}
