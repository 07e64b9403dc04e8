//! Evidence, from request to answer: the freshness it is bound to (its connection, or a nonce
//! this broker issued), the store's record of the VM, verification with the VM's policy (floor ∧
//! order), the pure decision of [`crate::release`], the seal, and the commit before the answer.

use crate::nonces::NonceBook;
use crate::release::{self, Denial};
use crate::service::Kbs;
use crate::store::{Commit, Store, VmRecord};
use proto::msg::{DenialBody, ReleaseBody, Response, VERSION};
use proto::order::Order;
use proto::{SealContext, seal};
use snp::Policy;
use std::sync::atomic::Ordering;
use zeroize::Zeroizing;

impl Kbs {
    /// Issues a single-use nonce for `vm_id` (the optional flow), kept in memory only.
    pub(crate) async fn challenge(&self, vm_id: &str, now: u64) -> Response {
        // Only ids an order could carry: the book keeps a copy of each.
        if !proto::order::is_valid_vm_id(vm_id) {
            self.metrics.errors.fetch_add(1, Ordering::Relaxed);
            return Response::error("bad_request", "vm_id must be 1-128 of [A-Za-z0-9._-]");
        }
        let mut nonce = [0u8; 32];
        let issued = aws_lc_rs::rand::fill(&mut nonce).is_ok()
            && self
                .book()
                .issue(nonce, vm_id, now.saturating_add(self.nonce_ttl), now);
        if !issued {
            self.metrics.errors.fetch_add(1, Ordering::Relaxed);
            return Response::error("unavailable", "no nonce can be issued now");
        }
        self.metrics.challenges.fetch_add(1, Ordering::Relaxed);
        Response::Challenge {
            v: VERSION,
            nonce: nonce.to_vec(),
            expires_in_ms: self.nonce_ttl.saturating_mul(1000),
        }
    }

    /// Decides on one piece of evidence and answers with a signed release or denial, committed
    /// first. `nonce` empty: bound to the connection whose exporter is `exporter`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn evidence(
        &self,
        vm_id: &str,
        nonce: &[u8],
        report: &[u8],
        cert_table: &[u8],
        (guest_pk, mesh_key): (&[u8], &[u8]),
        exporter: [u8; 32],
        now: u64,
    ) -> Response {
        // No nonce: the evidence is bound to this connection alone, whose exporter the broker's
        // own handshake made fresh; the connection loop admits one such per connection.
        let bound = nonce.is_empty();
        let nonce = if bound {
            Ok(proto::connection_nonce(&exporter))
        } else {
            <[u8; 32]>::try_from(nonce)
        };
        let (Ok(nonce), Ok(guest_pk)) = (nonce, <[u8; 32]>::try_from(guest_pk)) else {
            self.metrics.errors.fetch_add(1, Ordering::Relaxed);
            return Response::error(
                "bad_request",
                "the nonce must be empty or 32 bytes, and the guest key 32 bytes",
            );
        };
        // What REPORT_DATA must say: with a mesh key, that key is bound too.
        let Some(expected_report_data) =
            proto::expected_report_data(&nonce, &guest_pk, &exporter, mesh_key)
        else {
            self.metrics.errors.fetch_add(1, Ordering::Relaxed);
            return Response::error("bad_request", "a mesh key must be 32 bytes");
        };
        // An issued nonce is spent from here on, whatever follows; a connection's is never kept.
        let nonce_state = if bound {
            Some(release::NonceState::Bound)
        } else {
            self.book().take(&nonce, now)
        };
        // An issued nonce that is unknown (never issued here, or forgotten), spent or expired
        // cannot release anything, whatever the evidence: refused before the store is read or
        // written and without an audit entry (a decision on it was audited when it was first
        // used, or it never was issued), so a flood of such evidence costs neither the store nor
        // the log. (Evidence bound to its connection is one per handshake.) Counted:
        // `attesta_kbs_evidence_refused_total` and the denial reasons.
        let stale = match &nonce_state {
            None => Some(Denial::UnknownNonce),
            Some(release::NonceState::Spent) => Some(Denial::SpentNonce),
            Some(release::NonceState::Issued { expires_at, .. }) if now > *expires_at => {
                Some(Denial::ExpiredNonce)
            }
            Some(release::NonceState::Issued { .. } | release::NonceState::Bound) => None,
        };
        if let Some(d) = stale {
            return self.refuse_early(vm_id, &nonce, &d);
        }
        // Signed, so the guest knows it was this broker that could not decide (and asks again,
        // or asks another replica); nothing is recorded, as nothing can be.
        let record = match self.store.vm(vm_id).await {
            Ok(r) => r,
            Err(e) => {
                self.metrics.errors.fetch_add(1, Ordering::Relaxed);
                tracing::error!(error = %e, "the store cannot be read; denying");
                return self.deny(vm_id, &nonce, &["storage_unavailable"]);
            }
        };
        // Evidence for a VM this broker does not hold, or on a nonce issued for another VM,
        // cannot release anything either (challenges are free to ask for): refused before the
        // evidence is verified (so no key-server fetch) and without a store write or an audit
        // entry, so that a flood of such evidence grows neither the log nor the store.
        let unowned = match (&nonce_state, &record) {
            (_, None) => Some(Denial::UnknownVm),
            (
                Some(release::NonceState::Issued {
                    vm_id: issued_for, ..
                }),
                _,
            ) if issued_for != vm_id => Some(Denial::NonceForAnotherVm),
            _ => None,
        };
        if let Some(d) = unowned {
            return self.refuse_early(vm_id, &nonce, &d);
        }
        let (order, policy, verdict) = self
            .appraise(record.as_ref(), report, cert_table, now)
            .await;
        let parsed = verdict.report.as_ref();
        let decision = {
            // Held for the decision only (no await inside): the allowlist in force now.
            let allowlist = self.allowlist.read().await;
            release::decide(&release::Request {
                now,
                vm_id,
                nonce: nonce_state.as_ref(),
                vm: record.as_ref().map(|r| &r.state),
                report_data: parsed.map(|r| r.report_data).unwrap_or([0; 64]),
                expected_report_data,
                evidence: &verdict.reasons,
                measurement: parsed.map(|r| &r.measurement),
                allowlist: allowlist.as_ref(),
            })
        };
        // Sealed before the commit: a key that cannot be unwrapped or sealed makes the decision a
        // `key_unavailable` denial, committed and answered as such — the audit log never records
        // a release whose answer was a denial.
        let mut codes: Vec<&'static str> = match &decision.outcome {
            Ok(_) => Vec::new(),
            Err(d) => d.iter().map(Denial::code).collect(),
        };
        let sealed = match (&decision.outcome, record.as_ref(), parsed) {
            (Ok(state), Some(rec), Some(r)) => {
                let body = self.seal_release(rec, state, &order, &nonce, &guest_pk, &r.measurement);
                if body.is_none() {
                    codes.push("key_unavailable");
                }
                body
            }
            // `decide` releases only with a VM record and a parsed report.
            (Ok(_), _, _) => {
                codes.push("unknown_vm");
                None
            }
            (Err(_), _, _) => None,
        };
        let release = sealed.as_ref().and(decision.outcome.as_ref().ok());
        // `bound`: which freshness the evidence had (its connection, or an issued nonce).
        let freshness = if bound { "connection" } else { "nonce" };
        let (kind, mut detail) = match release {
            Some(v) => (
                "release",
                serde_json::json!({"nonce": hex::encode(nonce), "bound": freshness,
                    "boot_counter": v.boot_counter}),
            ),
            None => (
                "denial",
                serde_json::json!({"nonce": hex::encode(nonce), "bound": freshness,
                    "reasons": codes}),
            ),
        };
        evidence_detail(&mut detail, &verdict, report, record.as_ref(), &policy);
        // With the nonce, the guest key and the mesh key, the connection's exporter lets a third
        // party recompute REPORT_DATA: the key was sealed to the key this report bound. (An
        // exporter value reveals nothing of the session's traffic keys, RFC 8446 §7.5.)
        detail["exporter"] = hex::encode(exporter).into();
        detail["guest_key"] = hex::encode(guest_pk).into();
        if !mesh_key.is_empty() {
            detail["mesh_key"] = hex::encode(mesh_key).into();
        }
        // Every release starts the VM's lease afresh (crate::lease): live when it certifies the
        // guest's mesh key, else revoked, so that no earlier instance of the VM renews.
        let lease = match (release, parsed) {
            (Some(_), Some(r)) => {
                let certified = mesh_key.len() == 32
                    && order.as_ref().is_some_and(|o| o.mesh_ip.is_some())
                    && self.guest_issuer.get().is_some();
                Some(crate::store::Lease {
                    vm_id: vm_id.into(),
                    chip_id: r.chip_id.to_vec(),
                    measurement: r.measurement.to_vec(),
                    mesh_key: mesh_key.to_vec(),
                    renewed_at: now,
                    revoked: (!certified).then(|| "no_mesh_identity".to_string()),
                })
            }
            _ => None,
        };
        let commit = Commit {
            nonce,
            lease,
            lease_from: None,
            spend_nonce: decision.spend_nonce,
            nonce_expires_at: match &nonce_state {
                Some(release::NonceState::Issued { expires_at, .. }) => *expires_at,
                _ => now,
            },
            vm_update: release.cloned(),
            audit: (now, kind.into(), vm_id.into(), detail),
        };
        // Commit before emit: nothing is answered that is not durably recorded. A release that
        // lost a race inside the transaction was recorded as a denial and is answered as one.
        let committed = match self.store.commit(&commit).await {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error = %e, "decision could not be committed; denying");
                return self.deny(vm_id, &nonce, &["storage_unavailable"]);
            }
        };
        match (release, sealed) {
            (Some(state), Some(mut body)) if committed.released => {
                // The report bound this mesh key: certify it for this VM.
                if let (Ok(mk), Some(o), Some(issuer)) = (
                    <[u8; 32]>::try_from(mesh_key),
                    order.as_ref(),
                    self.guest_issuer.get(),
                ) {
                    match issuer.issue(o, &mk, now) {
                        Ok(der) => {
                            body.mesh_cert = der;
                            body.mesh_chain = issuer.chain().to_vec();
                        }
                        Err(e) => {
                            tracing::warn!(vm_id, error = %e, "no mesh certificate issued")
                        }
                    }
                }
                self.metrics.releases.fetch_add(1, Ordering::Relaxed);
                tracing::info!(vm_id, boot = state.boot_counter, "key released");
                Response::release(&self.response_key, &body)
            }
            (None, _) => {
                tracing::info!(vm_id, reasons = ?codes, "release denied");
                self.deny(vm_id, &nonce, &codes)
            }
            _ => self.deny(
                vm_id,
                &nonce,
                &[committed.lost_race.unwrap_or("unknown_vm")],
            ),
        }
    }

    /// Evidence appraised with the VM's order (its policy, images and chips) under the floor in
    /// force now; what the certificate table lacks comes from `[collateral]`. With no record
    /// or an unreadable order, nothing passes.
    pub(crate) async fn appraise(
        &self,
        record: Option<&VmRecord>,
        report: &[u8],
        cert_table: &[u8],
        now: u64,
    ) -> (Option<Order>, Policy, snp::Verdict) {
        let order = record.and_then(|r| Order::decode_stored(&r.order).ok());
        let policy = self.floor().effective(&vm_policy(order.as_ref()));
        let verdict = crate::collateral::verify(
            &self.verifier,
            self.collateral.get(),
            report,
            cert_table,
            order.as_ref(),
            &policy,
            now,
        )
        .await;
        (order, policy, verdict)
    }

    /// The nonce book (a poisoned lock is still a consistent book: every method leaves it so).
    fn book(&self) -> std::sync::MutexGuard<'_, NonceBook> {
        self.nonces.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn seal_release(
        &self,
        rec: &VmRecord,
        state: &release::VmState,
        order: &Option<Order>,
        nonce: &[u8; 32],
        guest_pk: &[u8; 32],
        measurement: &[u8; 48],
    ) -> Option<ReleaseBody> {
        let key = self
            .kek
            .unwrap_key(&state.vm_id, state.generation, rec.wrapped_key.as_deref()?)
            .ok()?;
        let boot_config = order
            .as_ref()
            .map(|o| o.boot_config.as_slice())
            .unwrap_or(&[]);
        // One buffer at its full size from the start: growing it would leave a copy of the key
        // in freed memory that nothing wipes.
        let mut payload = Zeroizing::new(Vec::with_capacity(key.0.len() + boot_config.len()));
        payload.extend_from_slice(&key.0[..]);
        payload.extend_from_slice(boot_config);
        let ctx = SealContext {
            vm_id: &state.vm_id,
            generation: state.generation,
            nonce: *nonce,
            measurement: *measurement,
        };
        let sealed = seal(guest_pk, &ctx, &payload).ok()?;
        Some(ReleaseBody {
            vm_id: state.vm_id.clone(),
            generation: state.generation,
            boot_counter: state.boot_counter,
            nonce: nonce.to_vec(),
            measurement: measurement.to_vec(),
            enc: sealed.enc.to_vec(),
            sealed: sealed.ciphertext,
            mesh_cert: Vec::new(),
            mesh_chain: Vec::new(),
        })
    }

    /// Evidence that cannot release anything, refused before a decision: counted, signed, and
    /// neither stored nor audited.
    fn refuse_early(&self, vm_id: &str, nonce: &[u8; 32], d: &Denial) -> Response {
        self.metrics
            .evidence_refused
            .fetch_add(1, Ordering::Relaxed);
        tracing::debug!(
            vm_id,
            reason = d.code(),
            "evidence refused before a decision"
        );
        self.deny(vm_id, nonce, &[d.code()])
    }

    fn deny(&self, vm_id: &str, nonce: &[u8; 32], reasons: &[&'static str]) -> Response {
        self.metrics.denied(reasons);
        Response::denial(
            &self.response_key,
            &DenialBody {
                vm_id: vm_id.into(),
                nonce: nonce.to_vec(),
                reasons: reasons.iter().map(|r| r.to_string()).collect(),
            },
        )
    }
}

/// What a third party needs to judge a decision on its own (`attesta-verify`), added to its audit
/// entry: the report (when it parsed) and the certificate that signed it, the chip and TCB it
/// names, the hash of the order it was judged under, and the policy applied (the floor and the
/// order's). Never key material.
fn evidence_detail(
    detail: &mut serde_json::Value,
    verdict: &snp::Verdict,
    report: &[u8],
    record: Option<&VmRecord>,
    policy: &Policy,
) {
    if let Some(r) = &verdict.report {
        detail["report"] = hex::encode(report).into();
        detail["chip_id"] = hex::encode(r.chip_id).into();
        detail["reported_tcb"] = format!("{:#018x}", r.reported_tcb).into();
        detail["measurement"] = hex::encode(r.measurement).into();
    }
    if let Some(c) = &verdict.vcek {
        detail["signer"] = serde_json::json!(verdict.signer);
        detail["vcek"] = hex::encode(c.der()).into();
    }
    if let Some(rec) = record {
        detail["order_sha256"] = hex::encode(proto::bundle::sha256(&rec.order)).into();
    }
    detail["policy"] = policy.to_toml().into();
}

/// The appraisal policy for a VM: its order's policy, restricted to the order's measurements and
/// chips. A VM whose order (or its policy) cannot be read allows nothing: fail closed.
pub fn vm_policy(order: Option<&Order>) -> Policy {
    match order {
        Some(o) => Policy::for_vm(&o.policy, &o.measurements, &o.chip_ids),
        None => Policy::nothing(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::order;

    #[test]
    fn the_vm_policy_follows_the_order_and_fails_closed() {
        let p = vm_policy(Some(&order("version = 1\nminimum_guest_svn = 3\n")));
        assert_eq!(p.minimum_guest_svn, 3);
        assert_eq!(p.measurements.as_ref().map(Vec::len), Some(1));
        assert_eq!(p.chip_ids.as_ref().map(Vec::len), Some(1));
        for nothing in [vm_policy(None), vm_policy(Some(&order("not toml ==")))] {
            assert_eq!(nothing.measurements, Some(vec![]));
            assert_eq!(nothing.chip_ids, Some(vec![]));
        }
    }
}
