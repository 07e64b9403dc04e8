//! Cutting a cloned VM off the mesh at once. When a lease is revoked (the VM's mesh key
//! attested on another chip or with another image, [`crate::lease`]), the broker does not wait
//! for the VM's certificates to expire: it signs a revocation list with its guests' CA — an
//! intermediate, whose list revokes only certificates it issued (`mesh::revocation`, delegated
//! lists) — installs it on its own mesh gate and sends it to the lighthouses, which push it to
//! every node; they close live connections to the revoked key in milliseconds.
//!
//! The list names, by key, every revoked mesh key whose last certificate was issued within the
//! longest lease (`guest_cert_secs`, counted as at least a day in case it was longer before a
//! restart) plus a minute: a certificate for an older one has expired anyway. The broker
//! compares it with the list the mesh holds for its CA — what its own node pulled from the
//! lighthouses, else what its gate holds — when a lease is revoked and every minute, and
//! publishes when they differ, numbered by the clock in milliseconds read before the store
//! (and above the number held). So replicas on one database converge on one list: one that
//! publishes from a stale read is corrected by the next round of any replica, and a send lost
//! on the way is made good the same way. A root guest CA cannot do this (its list would
//! replace the mesh operator's), nor one below another intermediate (nodes take lists only from
//! CAs a root issued): then VMs drop off within the lease, as before, and start says so.
//!
//! Not done: terminate and a withdrawn image or raised floor only stop renewals (the VM drops
//! off within its lease); only a clone is revoked at once.

use crate::service::Kbs;
use crate::store::{RevokedKey, Store};
use mesh::revocation::Body;
use std::sync::Arc;
use std::time::Duration;

/// Slack on top of a certificate's lifetime before an entry leaves the list (clock skew).
const SLACK_SECS: u64 = 60;
/// The shortest window an entry stays listed, whatever `guest_cert_secs` is now.
const MIN_WINDOW_SECS: u64 = 86_400;

/// The list's body: each revoked key (Ed25519, 32 bytes) by the hash its certificates carry.
/// Pure: the same keys always give the same body for a number and time.
pub fn list_body(ca: &str, number: u64, now: u64, keys: &[RevokedKey]) -> Body {
    let mut body = Body {
        v: 1,
        ca: ca.into(),
        number,
        issued_at: now,
        serials: Vec::new(),
        keys: keys
            .iter()
            .filter_map(|k| <[u8; 32]>::try_from(k.mesh_key.as_slice()).ok())
            .map(|k| hex::encode(mesh::cert::ed25519_key_hash(&k)))
            .collect(),
    };
    body.normalize();
    body
}

/// The next list's number: the clock in milliseconds, and always above the last one.
pub fn next_number(last: u64, now_ms: u64) -> u64 {
    now_ms.max(last.saturating_add(1))
}

/// Where a signed list goes: the broker's own gate, and the mesh through a node of its own.
#[derive(Clone, Default)]
pub struct Outlets {
    /// The broker's mesh gate (a revoked guest's keepalive is refused at the handshake).
    pub gate: Option<Arc<mesh::transport::Trust>>,
    /// A node connected to the lighthouses (`[mesh] lighthouses`).
    pub node: Option<mesh::node::Node>,
}

/// Publishes the broker's list whenever a lease is revoked, and whenever the mesh's copy
/// differs from the store (checked every `every`), until the process ends. Does nothing
/// without a guest CA that can revoke.
pub async fn follow(kbs: Arc<Kbs>, out: Outlets, every: Duration, clock: fn() -> u64) {
    loop {
        if let Err(e) = publish_once(&kbs, &out, clock()).await {
            tracing::warn!(error = %e, "guest revocation list not published");
        }
        tokio::select! {
            () = kbs.lease_revoked.notified() => {}
            () = tokio::time::sleep(every) => {}
        }
    }
}

/// One round: the list as the store has it now, published if the mesh holds another.
/// Ok(true) when one went out.
pub async fn publish_once(kbs: &Kbs, out: &Outlets, now: u64) -> Result<bool, String> {
    let Some(issuer) = kbs.guest_issuer.get().filter(|i| i.can_revoke()) else {
        return Ok(false);
    };
    // Read before the store: a list made from a later read gets a higher number.
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let window = issuer.ttl().max(MIN_WINDOW_SECS).saturating_add(SLACK_SECS);
    let keys = kbs
        .store
        .revoked_mesh_keys(now.saturating_sub(window))
        .await
        .map_err(|e| e.to_string())?;
    if keys.len() >= crate::store::MAX_REVOKED_LISTED {
        tracing::warn!(
            listed = keys.len(),
            "more revoked mesh keys than one list holds: the oldest are left to expire"
        );
    }
    let id = issuer.list_id();
    let on_gate = out.gate.as_ref().and_then(|t| t.list(&id));
    let held = match &out.node {
        Some(n) => n.trust().list(&id),
        None => on_gate.clone(),
    };
    // Another replica's list, come through the lighthouses: the gate holds it too.
    if let (Some(h), Some(g), Some(_)) = (&held, &out.gate, &out.node) {
        let _ = g.install(&h.bytes, now);
    }
    // Above every number either holds (the gate may hold one the mesh never got).
    let highest = [&held, &on_gate]
        .iter()
        .filter_map(|l| l.as_ref().map(|l| l.body.number))
        .max()
        .unwrap_or(0);
    let body = list_body(issuer.ca_name(), next_number(highest, now_ms), now, &keys);
    match &held {
        None if body.keys.is_empty() => return Ok(false),
        Some(h) if h.body.keys == body.keys => return Ok(false),
        _ => {}
    }
    let bytes = issuer.sign_revocations(&body)?;
    if let Some(t) = &out.gate
        && let Err(e) = t.install(&bytes, now)
    {
        tracing::warn!(error = %e, "the broker's own gate refused its revocation list");
    }
    if let Some(n) = &out.node {
        n.publish(&bytes).map_err(|e| e.to_string())?;
    }
    tracing::info!(
        number = body.number,
        keys = body.keys.len(),
        "guest revocation list published"
    );
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(b: u8, at: u64) -> RevokedKey {
        RevokedKey {
            vm_id: format!("vm-{b}"),
            mesh_key: vec![b; 32],
            certified_at: at,
            why: "lease_other_chip".into(),
        }
    }

    #[test]
    fn the_body_names_each_key_once_by_its_certificates_hash() {
        let a = list_body("guests", 5, 100, &[key(1, 10), key(2, 20), key(1, 30)]);
        let b = list_body("guests", 5, 100, &[key(2, 20), key(1, 10)]);
        assert_eq!(a, b);
        assert_eq!(
            a.keys,
            {
                let mut k = vec![
                    hex::encode(mesh::cert::ed25519_key_hash(&[1; 32])),
                    hex::encode(mesh::cert::ed25519_key_hash(&[2; 32])),
                ];
                k.sort();
                k
            },
            "hashes, not the raw keys"
        );
        assert!(a.serials.is_empty());
        // A key of the wrong length is skipped, not listed as garbage.
        let mut bad = key(3, 1);
        bad.mesh_key.pop();
        assert!(list_body("guests", 1, 1, &[bad]).keys.is_empty());
    }

    #[test]
    fn numbers_only_go_up() {
        assert_eq!(next_number(0, 1_000), 1_000);
        assert_eq!(next_number(1_000, 1_000), 1_001, "same millisecond");
        assert_eq!(next_number(5_000, 1_000), 5_001, "a clock stepped back");
        assert_eq!(next_number(u64::MAX, 1), u64::MAX);
    }
}
